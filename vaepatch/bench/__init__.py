"""`vaepatch bench ...`: the benchmarks, each a module with ``main(argv)``."""
from vaepatch.compare import mean_std  # noqa: F401  (mean ± std over runs, as compare reports it)


def fill_defaults(args, defaults: dict, quick: dict) -> None:
    """Give every option still None its default, --quick's where ``args.quick``: explicit flags win."""
    for key, value in {**defaults, **(quick if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
