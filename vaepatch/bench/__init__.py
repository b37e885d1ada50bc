"""`vaepatch bench ...`: the benchmarks, each a module with ``main(argv)``."""


def fill_defaults(args, defaults: dict, quick: dict) -> None:
    """Give every option still None its default, --quick's where ``args.quick``: explicit flags win."""
    for key, value in {**defaults, **(quick if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
