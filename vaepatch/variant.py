"""Variant: which scale parameterization each side of a hierarchical VAE uses.

A variant names a parameterization for the ``posterior`` (the encoder's q), the ``prior``
(the decoder's p over latents) and the ``decoder`` (a Normal over pixels, where the
upstream has one), plus optional OU smoothing of the prior.  ``None`` on a side means
"the upstream's own".  Built-in variants are the paper's Table 4 rows, one TOML file
each in ``vaepatch/patches/``.

Accepted forms (``Variant.parse``):

- a built-in name: ``"upbounded1"``
- a path to a TOML file with keys ``description``, ``posterior``, ``prior``, ``decoder``
  (each a scale spec, or ``"upstream"``) and an optional ``[ou]`` table (``rho``, ``samples``)
- an inline spec: ``"posterior=explin,prior=cst1"``, ``"upbounded1,ou=0.9x5"`` (a built-in
  name first, then overrides), ``"prior=cst1,ou=0.95x10"``
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Optional

from vaepatch import scales

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

SIDES = ("posterior", "prior", "decoder")
UPSTREAM = "upstream"
_KEYS = ("description",) + SIDES + ("ou",)
_FORMS = (
    "a built-in name ({names}), a path to a .toml file, or an inline spec like "
    "'posterior=explin,prior=cst1' or 'upbounded1,ou=0.9x5' (keys: posterior, prior, decoder, ou; "
    "a side's value is a scale spec or 'upstream')"
)


@dataclass(frozen=True)
class OU:
    """OU smoothing of the prior (Pervez & Gavves): correlation rho in [0, 1], K Monte-Carlo samples."""

    rho: float
    samples: int = 5

    def __post_init__(self):
        if not isinstance(self.rho, (int, float)) or not 0.0 <= float(self.rho) <= 1.0:
            raise ValueError(f"ou rho must be a number in [0, 1] (1 = no smoothing), got {self.rho!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"ou samples must be an integer >= 1 (the paper uses 5-10), got {self.samples!r}")

    @property
    def spec(self) -> str:
        return f"{float(self.rho)!r}x{self.samples}"  # repr: round-trips exactly (:g kept 6 digits)

    @classmethod
    def parse(cls, text) -> "OU":
        """``"0.9x5"`` -> OU(0.9, 5); ``"0.9"`` -> OU(0.9, 5); a dict with rho/samples."""
        if isinstance(text, OU):
            return text
        if isinstance(text, dict):
            unknown = set(text) - {"rho", "samples"}
            if unknown:
                raise ValueError(f"unknown ou key(s) {sorted(unknown)}; accepted: rho, samples")
            if "rho" not in text:
                raise ValueError("ou table needs 'rho' (in [0, 1]) and optionally 'samples' (>= 1)")
            return cls(text["rho"], text.get("samples", 5))
        rho, _, samples = str(text).strip().partition("x")
        try:
            return cls(float(rho), int(samples) if samples else 5)
        except ValueError as err:
            if "ou " in str(err):
                raise
            raise ValueError(f"malformed ou spec {text!r}; write RHO or RHOxSAMPLES, e.g. 0.9x5") from None


@dataclass(frozen=True)
class Variant:
    """Which parameterization each side uses; ``None`` keeps the upstream's own."""

    name: str
    posterior: Optional[scales.Scale] = None
    prior: Optional[scales.Scale] = None
    decoder: Optional[scales.Scale] = None
    ou: Optional[OU] = None
    description: str = field(default="", compare=False)

    @property
    def is_vanilla(self) -> bool:
        """True when nothing is replaced: patching with it changes no number."""
        return self.posterior is None and self.prior is None and self.decoder is None and self.ou is None

    @property
    def spec(self) -> str:
        """Canonical inline spec; ``Variant.parse(v.spec)`` gives back an equal variant."""
        parts = [f"{side}={getattr(self, side).spec}" for side in SIDES if getattr(self, side) is not None]
        if self.ou is not None:
            parts.append(f"ou={self.ou.spec}")
        return ",".join(parts) or "vanilla"

    def to_dict(self) -> dict:
        out = {side: (getattr(self, side).spec if getattr(self, side) else UPSTREAM) for side in SIDES}
        out["ou"] = None if self.ou is None else {"rho": self.ou.rho, "samples": self.ou.samples}
        return out

    def __str__(self):
        return self.name

    @classmethod
    def parse(cls, spec) -> "Variant":
        """A Variant from a built-in name, a TOML path, an inline spec or a Variant."""
        if isinstance(spec, Variant):
            return spec
        if not isinstance(spec, (str, os.PathLike)):
            raise ValueError(f"variant must be a string, path or Variant, got {type(spec).__name__}; "
                             f"accepted: {_forms()}")
        text = os.fspath(spec).strip()
        if not text:
            raise ValueError(f"empty variant spec; accepted: {_forms()}")
        if text.endswith(".toml") or (os.sep in text and "=" not in text):
            return from_toml(text)
        if "=" not in text and "," not in text:
            return builtin(text)
        return _parse_inline(text)


def _forms() -> str:
    return _FORMS.format(names=", ".join(sorted(variants())))


def _from_mapping(name: str, data: dict, where: str) -> Variant:
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; accepted keys: {', '.join(_KEYS)}")
    sides = {}
    for side in SIDES:
        value = data.get(side, UPSTREAM)
        if not isinstance(value, str):
            raise ValueError(f"{where}: {side} must be a scale spec string or 'upstream', got {value!r}")
        try:
            sides[side] = None if value.strip().lower() in (UPSTREAM, "vanilla") else scales.get(value)
        except ValueError as err:
            raise ValueError(f"{where}: {side}: {err}") from None
    ou = data.get("ou")
    try:
        ou = None if ou in (None, "none", "off") else OU.parse(ou)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return Variant(name, ou=ou, description=str(data.get("description", "")), **sides)


def from_toml(path) -> Variant:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"variant file {str(path)!r} does not exist; accepted: {_forms()}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"variant file {str(path)!r} is not valid TOML: {err}; "
                         f"accepted keys: {', '.join(_KEYS)}") from None
    return _from_mapping(path.stem, data, str(path))


def _builtin_files() -> dict:
    folder = resources.files("vaepatch") / "patches"
    return {f.name[: -len(".toml")]: f for f in folder.iterdir() if f.name.endswith(".toml")}


def builtin(name: str) -> Variant:
    files = _builtin_files()
    key = name.strip().lower()
    if key not in files:
        raise ValueError(f"unknown variant {name!r}; accepted: {_forms()}")
    return _from_mapping(key, tomllib.loads(files[key].read_text()), f"built-in variant {key!r}")


def variants() -> dict:
    """Built-in variant names -> one-line descriptions."""
    return {name: tomllib.loads(f.read_text()).get("description", "") for name, f in sorted(_builtin_files().items())}


def _split_top_level(text: str):
    """Split on commas that are not inside parentheses (``bounded(a, b)`` stays whole)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def split_list(text: str) -> list[str]:
    """A command-line list of variants or scale specs: split on ';' when there is one (for inline
    specs with commas, ``upbounded1;posterior=explin,prior=cst1``), else on commas outside
    parentheses (``bounded(a, b)`` stays whole). Empty items are dropped."""
    items = text.split(";") if ";" in text else _split_top_level(text)
    return [item.strip() for item in items if item.strip()]


def _parse_inline(text: str) -> Variant:
    items = _split_top_level(text)
    base = builtin(items.pop(0)) if items and "=" not in items[0] else None
    data = dict(base.to_dict()) if base else {}
    seen = set()
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise ValueError(f"malformed variant item {item!r} in {text!r}; write KEY=VALUE; accepted: {_forms()}")
        if key not in SIDES + ("ou",):
            raise ValueError(f"unknown variant key {key!r} in {text!r}; accepted keys: {', '.join(SIDES + ('ou',))}")
        if key in seen:
            raise ValueError(f"variant key {key!r} given twice in {text!r}; "
                             f"accepted keys, each at most once: {', '.join(SIDES + ('ou',))}")
        seen.add(key)
        data[key] = value.strip()
    variant = _from_mapping(text, data, f"variant {text!r}")
    if base is not None:
        variant = replace(variant, description=base.description)
    return variant
