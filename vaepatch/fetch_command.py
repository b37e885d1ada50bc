"""``vaepatch fetch``: clone the pinned upstreams (``vaepatch.upstream.fetch``), or check the clones on disk."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vaepatch import upstream

__all__ = ["main"]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
                        help="clone from here instead of the pinned URL (a local clone or bare "
                             "mirror works offline); only with a single target")
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
        if args.source and args.target == "all":
            parser.error("--source is one repository; name the target it is for "
                         f"({' or '.join(targets)})")
    except SystemExit as e:  # argparse exits on errors and --help; return the code instead
        return e.code if isinstance(e.code, int) else 2

    names = targets if args.target == "all" else [args.target]

    def dest_for(n: str) -> Path | None:
        if args.dest is None:
            return None
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
            upstream.fetch(n, source=args.source, dest=dest_for(n), force=args.force)
        except upstream.UpstreamError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
    return code
