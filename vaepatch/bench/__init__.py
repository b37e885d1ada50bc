"""`vaepatch bench ...`: the benchmarks, each a module with ``main(argv)``."""
import sys


def fill_defaults(args, defaults: dict, quick: dict) -> None:
    """Give every option still None its default, --quick's where ``args.quick``: explicit flags win."""
    for key, value in {**defaults, **(quick if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def no_clone(bench: str, target: str, path=None) -> bool:
    """True, after saying why and what to run, when ``target``'s clone is not found: the bench needs it."""
    from vaepatch import upstream

    try:
        upstream.require(target, path, why="this bench runs the real upstream.")
        return False
    except upstream.UpstreamError as err:
        print(f"vaepatch bench {bench}: {err}", file=sys.stderr)
        return True
