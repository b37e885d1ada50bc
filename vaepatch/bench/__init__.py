"""`vaepatch bench ...`: the benchmarks, each a module with ``main(argv)``."""


def fill_defaults(args, defaults: dict, quick: dict) -> None:
    """Give every option still None its default, --quick's where ``args.quick``: explicit flags win."""
    for key, value in {**defaults, **(quick if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def mean_std(values) -> dict:
    """``{"mean", "std", "n"}`` over the values that are not None (std 0 for one value; None for none)."""
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}
