"""Efficient-VDVAE's configuration: an ``hparams.cfg`` read when its modules are imported.

Its train.py takes no arguments: ``HParams('.', name="efficient_vdvae")`` (Rayhane-mamah/hparams) reads
``./hparams.cfg`` and every module then holds that one object (``HParams.get_hparams_by_name``), read at
import and at call time. A run therefore writes its own ``hparams.cfg`` (the clone's, or one of its
``egs/*.cfg``, with ``section.key=value`` overrides) into its own folder and loads it from there: the clone
is never edited. Values are Python expressions, as hparams evaluates them (``optimizer.learning_rate=0.01``,
``model.distribution_base='logstd'``).
"""
from __future__ import annotations

import configparser
import io
from pathlib import Path

__all__ = ["NAME", "FILENAME", "base_config", "parse_overrides", "write", "values", "load", "loaded", "unload"]

NAME = "efficient_vdvae"  # the name train.py loads its configuration under
FILENAME = "hparams.cfg"


def base_config(clone: Path, config: str | None = None) -> Path:
    """The config a run starts from: the clone's own ``hparams.cfg`` (its CIFAR-10 baseline) by default, a name
    from its ``egs/`` folder (``cifar10_C1``), or a path."""
    clone = Path(clone)
    if config is None:
        return clone / "efficient_vdvae_torch" / FILENAME
    path = Path(config).expanduser()
    if path.suffix != ".cfg" and "/" not in config:
        path = clone / "egs" / f"{config}.cfg"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (clone / "egs").glob("*.cfg")))
        raise ValueError(f"no Efficient-VDVAE config {config!r} ({path}); its egs/ has: {known}")
    return path


def _parser(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys as written
    parser.read_string(text)
    return parser


def parse_overrides(items) -> dict:
    """``["section.key=value", ...]`` -> ``{(section, key): value}``; anything else is a ValueError."""
    out = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        section, dot, name = key.strip().partition(".")
        if not (eq and dot and section and name and value.strip()):
            raise ValueError(f"Efficient-VDVAE takes its settings as section.key=value (its hparams.cfg), "
                             f"e.g. optimizer.learning_rate=0.01; got {item!r}")
        out[(section, name.strip())] = value.strip()
    return out


def write(base: Path, overrides: dict, folder: Path) -> Path:
    """``folder/hparams.cfg``: ``base`` with ``overrides`` (``{(section, key): value}``); an unknown section or
    key is a ValueError that lists the known ones (hparams itself would fail later, or ignore it)."""
    parser = _parser(Path(base).read_text())
    for (section, key), value in overrides.items():
        if not parser.has_section(section):
            raise ValueError(f"no section [{section}] in {base}; sections: {', '.join(parser.sections())}")
        if not parser.has_option(section, key):
            raise ValueError(f"no key {key!r} in [{section}] of {base}; keys: {', '.join(parser.options(section))}")
        parser.set(section, key, value)
    text = io.StringIO()
    parser.write(text)
    path = Path(folder) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    return path


def values(path: Path) -> dict:
    """``{(section, key): value}`` of a config file, each value as hparams reads it (a Python literal, or the
    text itself: ``run.name`` and words such as ``std``), without loading it."""
    import ast

    parser = _parser(Path(path).read_text())
    out = {}
    for section in parser.sections():
        for key, text in parser.items(section):
            try:
                out[(section, key)] = text if key == "name" else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                out[(section, key)] = text
    return out


def loaded():
    """The configuration loaded in this process under train.py's name, or None."""
    import sys

    module = sys.modules.get("hparams.hparams")
    return None if module is None else module.HParams._loaded_hparams_objects.get(NAME)


def load(folder: Path):
    """``HParams(folder, name="efficient_vdvae")``, as train.py does with ``folder`` its working directory: reads
    ``folder/hparams.cfg`` (or, resuming, the copy it archived in ``folder/logs-<run.name>``). One per process."""
    try:
        from hparams import HParams
    except ModuleNotFoundError:  # not on sys.path yet: the located clone's library (vaepatch fetch effvdvae)
        from vaepatch import upstream

        clone = upstream.locate("effvdvae")
        if clone is None:
            raise upstream.UpstreamError("no effvdvae clone to find its config library hparams in.\n"
                                         "run: vaepatch fetch effvdvae") from None
        upstream.activate("effvdvae", clone)
        from hparams import HParams

    if loaded() is not None:
        raise ValueError("an Efficient-VDVAE configuration is already loaded in this process; its modules hold it, "
                         "so another one needs a fresh interpreter")
    return HParams(str(folder), name=NAME)


def unload() -> None:
    """Forget the loaded configuration (tests that build several configurations in one process)."""
    config = loaded()
    if config is not None:
        import sys

        del sys.modules["hparams.hparams"].HParams._loaded_hparams_objects[NAME]
