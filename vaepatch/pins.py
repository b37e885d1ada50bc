"""The pins file (``vaepatch/upstream_pins.toml``, copied to ``third_party/UPSTREAM.toml``): one entry per
upstream codebase, or library one of them imports, at the exact code vaepatch's patches were written for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

__all__ = ["PINS_FILE", "Pin", "load_pins"]

PINS_FILE = Path(__file__).with_name("upstream_pins.toml")


@dataclass(frozen=True)
class Pin:
    """One upstream codebase at the exact commit vaepatch's patches were written for."""

    name: str
    url: str
    commit: str
    env: str
    modules: tuple[str, ...]
    tree: tuple[str, str] | None = None  # (path, tree id): a commit with this tree at path holds the pinned code
    root: str = ""  # the clone's folder its modules import from
    needs: tuple[str, ...] = ()  # libraries (other pins) the upstream imports
    library: bool = False  # a library a target needs, not a target of its own


def load_pins(path: Path = PINS_FILE) -> dict[str, Pin]:
    """Read the pins file; a malformed entry is a bug in the package, so fail loudly."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    pins = {}
    for name, entry in data.items():
        commit = str(entry["commit"]).lower()
        if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
            raise ValueError(f"{path}: [{name}] commit must be a full 40-hex sha, got {commit!r}")
        tree = entry.get("tree")
        if tree is not None and (set(tree) != {"path", "id"} or len(str(tree["id"])) != 40):
            raise ValueError(f"{path}: [{name}] tree must be {{path = FOLDER, id = 40-hex tree id}}, got {tree!r}")
        pins[name] = Pin(name=name, url=entry["url"], commit=commit, env=entry["env"],
                         modules=tuple(entry["modules"]), tree=(tree["path"], tree["id"]) if tree else None,
                         root=entry.get("root", ""), needs=tuple(entry.get("needs", ())),
                         library=bool(entry.get("library", False)))
    unknown = {need for p in pins.values() for need in p.needs} - set(pins)
    if unknown:
        raise ValueError(f"{path}: needs names unpinned libraries {sorted(unknown)}")
    return pins
