"""The generic patch engine: sets of (owner, attribute, replacement) applied and reverted as one unit.

It knows nothing about any particular upstream. Originals are recorded the way
``unittest.mock.patch`` does (from the owner's own ``__dict__``) so that ``revert()``
restores them exactly, and each original can be checked against a fingerprint of its
source at the pinned upstream commit before anything is changed.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import tokenize
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

__all__ = [
    "PatchError", "FingerprintMismatch", "FingerprintWarning",
    "fingerprint", "Patch", "PatchSet",
]

_ABSENT = object()  # marks an attribute that was not in the owner's own __dict__


class PatchError(RuntimeError):
    """A patch cannot be located, checked or applied."""


class FingerprintMismatch(PatchError):
    """The upstream source differs from the one the patch was written against."""


class FingerprintWarning(UserWarning):
    """Emitted instead of FingerprintMismatch when applying with strict=False."""


def _qualname(owner: Any, attribute: str) -> str:
    if inspect.isclass(owner):
        return f"{owner.__module__}.{owner.__qualname__}.{attribute}"
    return f"{getattr(owner, '__name__', owner)!s}.{attribute}"


def _canonical(node: Any) -> str:
    """Like ``ast.dump(node, include_attributes=False)`` but omitting None and empty-list fields,
    so the text does not depend on the Python version (3.12 adds ``type_params=[]``, 3.13
    hides empty fields by default) for code that uses no new syntax."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_canonical(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and value != []]
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return "[" + ", ".join(_canonical(item) for item in node) + "]"
    return repr(node)


def fingerprint(owner: Any, attribute: str) -> str:
    """16-hex-char sha256 of the AST of ``attribute``'s definition in ``owner``'s source file.

    Goes through the module file rather than the live object because ``torch.jit.script``
    functions cannot be read by ``inspect.getsource``; hashing the AST ignores whitespace
    and comments but catches any code change (docstrings and decorators included).
    ``owner`` is a module (top-level def/class ``attribute``) or a class (a method defined
    in that class's own body; inherited or by-value-imported names are not found here:
    fingerprint them where they are defined).
    """
    where = _qualname(owner, attribute)
    module = sys.modules.get(owner.__module__) if inspect.isclass(owner) else owner
    try:
        path = inspect.getsourcefile(module)
        if path is None:
            raise OSError("no source file")
        with tokenize.open(path) as f:  # honours coding declarations; never a stale cache
            tree = ast.parse(f.read(), filename=path)
    except (TypeError, OSError, SyntaxError) as e:
        raise PatchError(f"cannot read the source of {where}: {e}") from e

    body = tree.body
    if inspect.isclass(owner):
        for part in owner.__qualname__.split("."):  # walks nested classes; top-level is one part
            classes = [n for n in body if isinstance(n, ast.ClassDef) and n.name == part]
            if not classes:
                raise PatchError(f"class {owner.__qualname__} not found in {path} (looking for {where})")
            body = classes[-1].body
        kinds: tuple = (ast.FunctionDef, ast.AsyncFunctionDef)
    else:
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    found = [n for n in body if isinstance(n, kinds) and n.name == attribute]
    if not found:
        raise PatchError(f"no definition of {where} in {path}")
    # The last definition is the one Python binds.
    return hashlib.sha256(_canonical(found[-1]).encode()).hexdigest()[:16]


@dataclass
class Patch:
    """Replace ``owner.attribute`` (module or class) with ``replacement``.

    ``fingerprint`` is the expected fingerprint of the original at the pinned upstream
    commit (None: don't check). On a class, ``replacement`` is stored as is, so wrap it
    in ``staticmethod``/``classmethod`` yourself where needed.
    """
    owner: Any
    attribute: str
    replacement: Any
    fingerprint: Optional[str] = None


class PatchSet:
    """Patches applied and reverted together; ``apply`` changes all of them or none."""

    def __init__(self, patches: Iterable[Patch], *, label: str = "", pinned_commit: Optional[str] = None):
        self.patches = list(patches)
        self.label = label
        self.pinned_commit = pinned_commit
        self._originals: Optional[list] = None  # [(patch, original or _ABSENT)] while applied
        seen = set()
        for p in self.patches:
            key = (id(p.owner), p.attribute)
            if key in seen:
                raise ValueError(f"{_qualname(p.owner, p.attribute)} is patched twice in {label or 'this PatchSet'}")
            seen.add(key)

    @property
    def applied(self) -> bool:
        return self._originals is not None

    def check(self) -> list:
        """Messages for every patch whose original does not match its expected fingerprint."""
        problems = []
        for p in self.patches:
            if p.fingerprint is None:
                continue
            try:
                found = fingerprint(p.owner, p.attribute)
            except PatchError as e:
                found = f"<not found: {e}>"
            if found != p.fingerprint:
                problems.append(f"{_qualname(p.owner, p.attribute)}: expected fingerprint {p.fingerprint} "
                                f"(pinned commit {self.pinned_commit or 'unknown'}), found {found}")
        return problems

    def apply(self, strict: bool = True) -> "PatchSet":
        """Check every fingerprint, then patch everything; a no-op if already applied."""
        if self.applied:
            return self
        problems = self.check()
        if problems:
            msg = (f"{self.label or 'patch set'}: upstream source differs from the pinned commit "
                   f"{self.pinned_commit or 'unknown'}:\n  " + "\n  ".join(problems) +
                   "\nThe upstream clone is probably at another commit. Run `vaepatch fetch --check`, "
                   "or apply with strict=False to patch anyway.")
            if strict:
                raise FingerprintMismatch(msg)
            warnings.warn(msg, FingerprintWarning, stacklevel=2)

        # Record every original first (as mock.patch does: the owner's own __dict__ only).
        originals = [(p, vars(p.owner).get(p.attribute, _ABSENT)) for p in self.patches]
        done = []
        try:
            for p, original in originals:
                setattr(p.owner, p.attribute, p.replacement)
                done.append((p, original))
        except BaseException:
            self._restore(done)
            raise
        self._originals = originals
        return self

    def revert(self) -> None:
        """Restore every original exactly (same objects); a no-op if not applied."""
        if self._originals is None:
            return
        originals, self._originals = self._originals, None
        self._restore(originals)

    @staticmethod
    def _restore(originals: list) -> None:
        """Undo in reverse order; try every patch even if one fails, then raise the first error."""
        error = None
        for p, original in reversed(originals):
            try:
                if original is _ABSENT:
                    delattr(p.owner, p.attribute)  # was inherited or missing: uncover it again
                else:
                    setattr(p.owner, p.attribute, original)
            except Exception as e:  # noqa: BLE001 - keep restoring the others
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> "PatchSet":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return f"<PatchSet {self.label or ''} {len(self.patches)} patches, {state}>"
