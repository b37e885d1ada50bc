"""What every launcher shares, knowing no upstream.

- ``events``: the per-step ``events.jsonl`` record, its writer and reader, and the counts;
- ``manifest``: ``run.json``, written atomically, one set of keys for every launcher;
- ``recorder``: the step-recorder base class (one event per step, ``--max-steps``);
- ``launch``: variant, clone and device checks before a run, teardown after;
- ``script``: running an upstream script's ``__main__`` block;
- ``shims``: the today's-stack shim engine and the CPU shims every upstream needs;
- ``logs``: the registry of upstreams' own log readers, for ``vaepatch compare``.
"""
