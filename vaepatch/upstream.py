"""Pinned upstream clones (openai/vdvae, NVlabs/NVAE, Efficient-VDVAE and the libraries they import):
where they live, fetching, verifying.

vaepatch never vendors or edits upstream code. It patches the upstream modules at runtime, and
every patch is written against one exact commit, so this module makes sure the clone on disk is
that commit and untouched before anything imports it.

The pins live in ``vaepatch/upstream_pins.toml`` (shipped in the wheel, so an installed package
works without the repo); ``third_party/UPSTREAM.toml`` is an identical copy for people reading
the repo. GitPython is imported inside the functions that need it so ``import vaepatch`` stays
light.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from vaepatch import git_clone
from vaepatch.pins import Pin, load_pins

__all__ = [
    "Pin", "PINS", "pin", "UpstreamError", "Status", "repo_root", "default_dest", "fetch",
    "status", "check", "locate", "require", "verify", "add_to_path", "activate",
]


class UpstreamError(RuntimeError):
    """A clone is missing, at the wrong commit, modified, or cannot be fetched.

    Every message says what is wrong and the exact command that fixes it.
    """


PINS: dict[str, Pin] = load_pins()


def pin(name: str) -> Pin:
    """The pin for ``name``; an unknown name lists the known ones."""
    try:
        return PINS[name]
    except KeyError:
        raise ValueError(f"unknown upstream {name!r}; known targets: "
                         f"{', '.join(sorted(PINS))}") from None


# --------------------------------------------------------------------------- locations

def repo_root() -> Path | None:
    """The vaepatch source checkout we run from, if any.

    It is the first directory above the package that holds ``third_party/UPSTREAM.toml``; an
    installed package (site-packages) has none, and then clones go to a per-user cache.
    """
    here = Path(__file__).resolve().parent
    for d in (here, *here.parents):
        if (d / "third_party" / "UPSTREAM.toml").is_file():
            return d
    return None


def default_dest(name: str) -> Path:
    """Where ``vaepatch fetch NAME`` puts the clone when nobody says otherwise.

    Source checkout: ``<repo>/third_party/<name>`` (git-ignored). Installed package:
    ``$VAEPATCH_HOME/<name>``, else ``~/.cache/vaepatch/<name>``.
    """
    pin(name)
    root = repo_root()
    if root is not None:
        return root / "third_party" / name
    home = os.environ.get("VAEPATCH_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "vaepatch"
    return base / name


def _configured_path(name: str) -> Path:
    """The clone path fetch/status use by default: ``$VAEPATCH_<NAME>`` if set, else default_dest.

    Keeping fetch and locate on the same path means "fetch, then run" always finds the clone.
    """
    env = os.environ.get(pin(name).env)
    return Path(env).expanduser() if env else default_dest(name)


def _fetch_cmd(name: str, dest: Path | None = None, *, force: bool = False,
               source: str | None = None) -> str:
    """The exact ``vaepatch fetch`` command line for ``name`` (``--dest`` only when needed)."""
    parts = ["vaepatch", "fetch", name]
    if source:
        parts += ["--source", str(source)]
    if dest is not None and Path(dest).expanduser().absolute() != \
            _configured_path(name).expanduser().absolute():
        parts += ["--dest", str(dest)]
    if force:
        parts.append("--force")
    return " ".join(shlex.quote(p) for p in parts)


def locate(name: str, upstream: str | os.PathLike | None = None) -> Path | None:
    """Find the clone of ``name``: the ``upstream`` argument, then ``$VAEPATCH_<NAME>``, then
    :func:`default_dest`. Returns None when only the default was tried and it is absent.

    An explicit path (argument or env var) that does not exist raises: silently using some
    other clone would run the wrong code without anyone noticing.
    """
    p = pin(name)
    if upstream is not None:
        where, path = f"upstream={str(upstream)!r}", Path(upstream).expanduser()
    elif os.environ.get(p.env):
        where, path = f"${p.env}={os.environ[p.env]!r}", Path(os.environ[p.env]).expanduser()
    else:
        path = default_dest(name)
        return path.resolve() if path.is_dir() else None
    if not path.is_dir():
        raise UpstreamError(
            f"{where} points to {path}, which is not a directory, so there is no {name} clone "
            f"to use.\nrun: vaepatch fetch {shlex.quote(name)} --dest {shlex.quote(str(path))}")
    return path.resolve()


def require(name: str, upstream: str | os.PathLike | None = None, why: str = "") -> Path:
    """:func:`locate`, raising where it finds nothing: the error says where it looked, ``why`` the caller
    needs the clone, and the fetch command."""
    path = locate(name, upstream)
    if path is None:
        raise UpstreamError(f"no {name} clone found (looked at ${pin(name).env}, {default_dest(name)})"
                            f"{': ' + why if why else ''}\nrun: vaepatch fetch {shlex.quote(name)}")
    return path


def add_to_path(path: str | os.PathLike) -> None:
    """Put a clone first on ``sys.path`` (once), so its top-level modules import by name."""
    entry = str(Path(path).resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)


def activate(name: str, path: str | os.PathLike) -> None:
    """Make the clone of ``name`` at ``path`` importable: its pin's ``root`` folder and the verified clone of
    each library it ``needs`` go first on ``sys.path``."""
    p = pin(name)
    for need in p.needs:
        where = locate(need)
        if where is None:
            raise UpstreamError(f"{name} imports {need} ({pin(need).url}), and there is no clone of it at "
                                f"{default_dest(need)} (nor ${pin(need).env}).\nrun: vaepatch fetch {need}")
        add_to_path(verify(where, need))
    add_to_path(Path(path) / p.root)


# --------------------------------------------------------------------------- git helpers

def _git():
    """Import GitPython lazily; it needs a git executable, so say how to get both."""
    try:
        import git
    except ImportError as e:
        raise UpstreamError(
            f"GitPython is needed to fetch and verify upstream clones ({e}).\n"
            "run: pip install gitpython   (and install the git command-line tool)") from None
    return git


def _open_repo(path: Path):
    _git()  # GitPython present, or an UpstreamError that says how to get it
    return git_clone.open_repo(path)


def _source_arg(source: str) -> str:
    """Local paths become absolute, so the clone's origin stays valid from any directory."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def _missing_commit_error(p: Pin, source: str, dest: Path, force: bool) -> UpstreamError:
    if source == p.url:
        fix = ("The upstream no longer has it; fetch from a clone or mirror that does:\n"
               f"run: {_fetch_cmd(p.name, dest, force=force, source='/path/to/clone-or-mirror')}")
    else:
        fix = f"run: {_fetch_cmd(p.name, dest, force=force, source=p.url)}"
    return UpstreamError(
        f"{source} does not contain {p.name}'s pinned commit {p.commit}{_tree_words(p)}.\n{fix}")


def _tree_words(p: Pin) -> str:
    return f" (nor any commit whose {p.tree[0]}/ is the pinned tree {p.tree[1]})" if p.tree else ""


def _at_pin(repo, p: Pin) -> bool:
    """HEAD is the pinned commit, or (a pin with a tree) a commit holding the pinned tree."""
    head = git_clone.head(repo)
    return head == p.commit or (p.tree is not None and head is not None
                                and git_clone.tree_at(repo, head, p.tree[0]) == p.tree[1])


def _bring_pin(repo, source: str, p: Pin) -> str | None:
    """The commit to check out for ``p``, brought in from ``source``: the pinned one, else (a tree pin)
    the newest commit there whose folder is the pinned tree; None if the source has neither."""
    if git_clone.bring_commit(repo, source, p.commit):
        return p.commit
    return git_clone.commit_with_tree(repo, *p.tree) if p.tree else None


# --------------------------------------------------------------------------- verify / status

def verify(path: str | os.PathLike, name: str, allow_dirty: bool = False) -> Path:
    """Check that ``path`` is a clone of ``name`` at the pinned commit with unmodified tracked
    files; return it resolved. Raises UpstreamError with the fix otherwise.

    vaepatch's patches and fingerprints are exact for the pinned commit; any other code could
    be patched wrongly, so this refuses it instead of hoping.
    """
    p = pin(name)
    path = Path(path).expanduser()
    q = shlex.quote(str(path))
    if not path.is_dir():
        raise UpstreamError(
            f"{name}: {path} does not exist or is not a directory.\n"
            f"run: vaepatch fetch {name} --dest {q}")
    repo = _open_repo(path)
    if repo is None:
        raise UpstreamError(
            f"{name}: {path} is not a git checkout, so its commit cannot be checked.\n"
            f"Move it aside, then run: vaepatch fetch {name} --dest {q}")
    head = git_clone.head(repo)
    if not _at_pin(repo, p):
        found = f"; its {p.tree[0]}/ is tree {git_clone.tree_at(repo, head, p.tree[0])}" if p.tree and head else ""
        raise UpstreamError(
            f"{name}: {path} is at commit {head}{found}, but vaepatch is pinned to {p.commit}{_tree_words(p)}.\n"
            f"run: {_fetch_cmd(name, path, force=True)}\n"
            f"  or: git -C {q} checkout {p.commit}")
    modified = git_clone.modified_files(repo)
    if modified:
        msg = (f"{name}: {path} has modified tracked files: {', '.join(modified)}.\n"
               f"vaepatch never edits the clone (it patches at runtime), so these are someone "
               f"else's edits and would change what gets patched.\n"
               f"run: git -C {q} stash   (keeps the edits)\n"
               f"  or: {_fetch_cmd(name, path, force=True)}   (discards them)")
        if not allow_dirty:
            raise UpstreamError(msg)
        warnings.warn(msg, stacklevel=2)
    return path.resolve()


@dataclass
class Status:
    """What is on disk for one target, for ``vaepatch fetch --check``."""

    name: str
    path: Path
    present: bool          # the directory exists
    commit: str | None     # its HEAD, if it is a git checkout
    dirty: bool | None     # tracked files modified, if it is a git checkout
    ok: bool               # usable: pinned commit and clean
    message: str           # "ok", or what is wrong and the command that fixes it
    state: str = ""        # one word or two for the table: ok, missing, wrong commit, ...


def status(name: str, path: str | os.PathLike | None = None) -> Status:
    """Inspect the clone of ``name`` at ``path`` (default: ``$VAEPATCH_<NAME>`` or
    default_dest) without raising."""
    p = pin(name)
    path = Path(path).expanduser() if path is not None else _configured_path(name)
    present = path.exists()
    commit = dirty = None
    at_pin = False
    repo = _open_repo(path) if path.is_dir() else None
    if repo is not None:
        commit = git_clone.head(repo)
        dirty = bool(git_clone.modified_files(repo))
        at_pin = _at_pin(repo, p)
    try:
        verify(path, name)
        message, state = "ok", "ok"
    except UpstreamError as e:
        message = str(e)
        if not present:
            state = "missing"
        elif repo is None:
            state = "not a git checkout"
        elif not at_pin:
            state = "wrong commit"
        else:
            state = "dirty"
    return Status(name=name, path=path, present=present, commit=commit, dirty=dirty,
                  ok=(state == "ok"), message=message, state=state)


def check(path: str | os.PathLike | None = None,
          names: list[str] | None = None) -> list[Status]:
    """Status of every target (or ``names``). ``path`` is a base directory holding one
    ``<name>`` clone per target; by default each target's own configured location."""
    names = list(PINS) if names is None else names
    return [status(n, None if path is None else Path(path) / n) for n in names]


# --------------------------------------------------------------------------- fetch

def fetch(name: str, source: str | os.PathLike | None = None,
          dest: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Clone ``name`` at its pinned commit (detached) into ``dest`` and return the path.

    ``source`` is a URL or a local clone / bare mirror (default: the pin's url); ``dest``
    defaults to ``$VAEPATCH_<NAME>`` or :func:`default_dest`. An existing clone at the pinned
    commit is left alone. One at another commit, or with modified tracked files, is an error
    unless ``force`` -- then the commit is fetched into it and checked out, discarding those
    modifications.
    """
    p = pin(name)
    source = _source_arg(str(source)) if source is not None else p.url
    dest = Path(dest).expanduser() if dest is not None else _configured_path(name)

    if dest.exists() and not dest.is_dir():
        raise UpstreamError(
            f"{name}: {dest} exists and is not a directory.\n"
            f"Remove it or pick another place: vaepatch fetch {name} --dest /other/dir")
    if dest.is_dir() and any(dest.iterdir()):
        return _update_existing(p, source, dest, force)

    # Clone beside dest and rename at the end: a dest that exists is always a whole clone.
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        dest.rmdir()  # empty
    git = _git()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        print(f"{name}: cloning {source} into {dest}")
        try:
            repo = git.Repo.clone_from(source, tmp, no_checkout=True,
                                       env={"GIT_TERMINAL_PROMPT": "0"})
        except git.GitCommandError as e:
            raise UpstreamError(
                f"{name}: could not clone {source}: {(e.stderr or str(e)).strip()}\n"
                f"Offline? Fetch from a local clone or bare mirror instead:\n"
                f"run: {_fetch_cmd(name, dest, source='/path/to/clone-or-mirror')}") from None
        commit = _bring_pin(repo, source, p)
        if commit is None:
            raise _missing_commit_error(p, source, dest, False)
        git_clone.checkout(repo, commit)
        repo.close()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    verify(dest, name)
    print(f"{name}: checked out {_pinned_words(p, commit)} at {dest}")
    return dest.resolve()


def _pinned_words(p: Pin, commit: str) -> str:
    if commit == p.commit:
        return f"pinned commit {p.commit[:12]}"
    return f"commit {commit[:12]}, whose {p.tree[0]}/ is the pinned tree {p.tree[1][:12]} (of {p.commit[:12]})"


def _update_existing(p: Pin, source: str, dest: Path, force: bool) -> Path:
    """fetch() into a non-empty ``dest``: no-op if already right, else only with ``force``."""
    repo = _open_repo(dest)
    if repo is None:
        # Never delete a directory we did not create, even with --force.
        verify(dest, p.name)  # raises "not a git checkout" with the fix
    head, modified = git_clone.head(repo), git_clone.modified_files(repo)
    if _at_pin(repo, p) and not modified:
        print(f"{p.name}: already at {_pinned_words(p, head)} ({dest})")
        return dest.resolve()
    if not force:
        verify(dest, p.name)  # raises: wrong commit or dirty, with the fix
    if modified:
        print(f"{p.name}: --force: discarding modifications to tracked files in {dest}: "
              f"{', '.join(modified)}")
    commit = head
    if not _at_pin(repo, p):
        print(f"{p.name}: --force: moving {dest} from {head} to {p.commit} (from {source})")
        commit = _bring_pin(repo, source, p)
        if commit is None:
            raise _missing_commit_error(p, source, dest, True)
    git_clone.checkout(repo, commit)
    repo.close()
    verify(dest, p.name)
    print(f"{p.name}: checked out {_pinned_words(p, commit)} at {dest}")
    return dest.resolve()
