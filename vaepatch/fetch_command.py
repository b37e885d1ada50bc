"""``vaepatch fetch``: clone the pinned upstreams (``vaepatch.upstream.fetch``), or check the clones on disk.

``vaepatch fetch NAME`` also fetches the libraries NAME's pin ``needs`` (Efficient-VDVAE's ``hparams``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vaepatch import upstream

__all__ = ["main"]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _sources(folder, names: list[str]) -> dict:
    """Per target, its clone source inside ``folder`` (``<name>.bundle``, else ``<name>``); all None
    without a folder (the pinned URLs)."""
    if folder is None:
        return {n: None for n in names}
    base = Path(folder).expanduser()
    found = {n: next((str(p) for p in (base / f"{n}.bundle", base / n) if p.exists()), None) for n in names}
    missing = [n for n, src in found.items() if src is None]
    if not base.is_dir() or missing:
        raise ValueError(f"--source {folder} with every target must be a folder holding <name>.bundle or <name> "
                         f"for each of {', '.join(names)}; missing: {', '.join(missing or names)}. "
                         "For one repository, name its target: vaepatch fetch NAME --source URL_OR_PATH")
    return found


def _named_sources(target: str, source) -> dict:
    """``vaepatch fetch NAME``: NAME and the libraries its pin ``needs``, each with its source. A ``--source``
    folder holding ``<name>.bundle`` (or ``<name>``) serves each of them from there; a library is also found
    beside a given bundle or clone (``DIR/hparams.bundle`` next to ``DIR/effvdvae.bundle``); else its URL."""
    names = [target, *upstream.pin(target).needs]
    if source is None:
        return {n: None for n in names}
    here = Path(source).expanduser()
    folder = here if here.is_dir() else here.parent
    found = {n: next((str(p) for p in (folder / f"{n}.bundle", folder / n) if p.exists()), None) for n in names}
    own = found[target] if here.is_dir() and found[target] and not (here / ".git").exists() else str(source)
    return {target: own, **{n: found[n] for n in names[1:]}}


def main(argv: list[str] | None = None) -> int:
    """``vaepatch fetch [TARGET] [--source S] [--dest D] [--force]`` / ``vaepatch fetch --check``.

    Returns the exit code: 0 fine, 1 a --check found a problem, 2 an error (message on stderr,
    no traceback) or bad arguments.
    """
    targets = list(upstream.PINS)
    parser = argparse.ArgumentParser(
        prog="vaepatch fetch",
        description="Clone the pinned upstream codebases, or check the clones on disk.",
        epilog="Without --dest, clones go to $VAEPATCH_<NAME> if set, else third_party/<name> "
               "in a source checkout, else $VAEPATCH_HOME/<name> or ~/.cache/vaepatch/<name>.")
    parser.add_argument("target", nargs="?", default="all", choices=[*targets, "all"],
                        help="which upstream (default: all)")
    parser.add_argument("--source", metavar="URL_OR_PATH",
                        help="clone from here instead of the pinned URL (a local clone, bare mirror or git "
                             "bundle works offline); with 'all', a folder holding <name>.bundle or <name> "
                             "per target")
    parser.add_argument("--dest", metavar="DIR",
                        help="the clone directory; with 'all', a directory that gets one "
                             "<name> subdirectory per target")
    parser.add_argument("--force", action="store_true",
                        help="move an existing clone to the pinned commit, discarding "
                             "modifications to its tracked files")
    parser.add_argument("--check", action="store_true",
                        help="report each clone's path, commit and status; fetch nothing")
    try:
        args = parser.parse_args(argv)
        if args.check and (args.source or args.force):
            parser.error("--check fetches nothing; it takes no --source or --force")
        sources = _sources(args.source, targets) if args.target == "all" else _named_sources(args.target, args.source)
        names = list(sources)
    except SystemExit as e:  # argparse exits on errors and --help; return the code instead
        return e.code if isinstance(e.code, int) else 2
    except ValueError as e:
        print(f"vaepatch fetch: {e}", file=sys.stderr)
        return 2

    def dest_for(n: str) -> Path | None:
        if args.dest is None or (args.target != "all" and n != args.target):
            return None  # a library a named target needs goes to its own place
        return Path(args.dest) / n if args.target == "all" else Path(args.dest)

    if args.check:
        statuses = [upstream.status(n, dest_for(n)) for n in names]
        rows = [["target", "path", "commit", "status"]]
        rows += [[s.name, str(s.path), s.commit[:12] if s.commit else "-", s.state]
                 for s in statuses]
        print(_table(rows))
        for s in statuses:
            if not s.ok:
                print(f"\n{s.message}")
        return 0 if all(s.ok for s in statuses) else 1

    code = 0
    for n in names:
        try:
            upstream.fetch(n, source=sources[n], dest=dest_for(n), force=args.force)
        except upstream.UpstreamError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
    return code
