"""`vaepatch demo`: the overfitting experiment's encoder column, in a few minutes on 2 CPU cores.

The smallest honest version of ``vaepatch bench overfit`` (the paper's section 7.1): the conv
VAE overfits 10 natural crops on 0..255 at lr 0.008 with each encoder scale (naive_exp, exp,
explin, upbounded1), 5 seeds each, and every run leaves ``run.json`` and per-step
``events.jsonl`` in the launcher's format, so ``vaepatch compare`` reads them like real runs.

The decoder scale is fixed to ``bounded(1/sqrt(12), 256)``, the paper's pixel bounds on 0..255,
because with it only the encoder can fail: the pixel scale stays in [1/sqrt(12), 256] with an
exact log, and the loss starts near 2e4 and ends near 1.4e4, far from the 1e6 divergence line
(an exp decoder starts at sigma = 1, loss ~3e7, so short runs look diverged, and its huge early
gradients make exp fail as surely as naive_exp, blurring the two failure modes). In the full
grid at lr 0.008 this decoder gives naive_exp 5/5 failures (log(exp(p)) underflows as the
encoder's scale is driven to zero), exp 3-4/5 (exp(2p) in the KL overflows when p spikes upward),
explin and upbounded1 0/5, and naive_exp fails within the first 40 steps, so even ``--quick``
shows it.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from vaepatch import compare, scales
from vaepatch.models import conv_vae
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest

TARGET = "conv-vae-overfit"
LR = 0.008
ENCODERS = ("naive_exp", "exp", "explin", "upbounded1")
DECODER = "bounded"


def status_of(result: conv_vae.Result) -> str:
    if result.reason in ("nan_loss", "nan_grad"):
        return f"failed: NaN at step {result.step_failed}"
    return "diverged" if result.reason == "diverged" else "completed"


def run_one(out: str, encoder: str, decoder: str, seed: int, steps: int, lr: float, argv: list[str]) -> dict:
    """One training run in ``out/<encoder>-seed<S>``: run.json, then one event per step."""
    run_dir = Path(out) / f"{encoder}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / events.FILENAME).unlink(missing_ok=True)  # a rerun replaces the run, never mixes two
    encoder_spec = scales.get(conv_vae.ENCODERS.get(encoder, encoder)).spec
    decoder_spec = scales.get(conv_vae.DECODERS.get(decoder, decoder)).spec
    manifest = run_manifest.new(TARGET, f"encoder={encoder},decoder={decoder}",
                                f"encoder={encoder_spec},decoder={decoder_spec}", upstream_commit=None, seed=seed,
                                argv=argv, loss_unit="nats/image", status="running", ended=None, lr=lr, steps=steps,
                                batch=conv_vae.BATCH)
    run_manifest.write(run_dir / run_manifest.FILENAME, manifest)
    with events.EventWriter(run_dir / events.FILENAME) as writer:
        def on_step(step, loss, grad_norm, failed_reason, seconds):
            nan = failed_reason is not None
            writer.write(step, loss, grad_norm, skipped=nan, reason="nan" if nan else None, time=seconds)

        result = conv_vae.train_one(encoder, decoder, lr, seed, steps, on_step=on_step)
    manifest.update(status=status_of(result), ended=run_manifest.now())
    run_manifest.write(run_dir / run_manifest.FILENAME, manifest)
    return {"encoder": encoder, "seed": seed, "status": manifest["status"], "step_failed": result.step_failed,
            "reason": result.reason, "final_loss": result.final_loss, "seconds": result.seconds}


def _run_one(job: tuple) -> dict:
    return run_one(*job)


def summary_line(results: list[dict], encoders) -> str:
    """One line per the table: how many runs of each encoder hit NaN, and when."""
    parts = []
    for encoder in encoders:
        mine = [r for r in results if r["encoder"] == encoder]
        nan = sorted(r["step_failed"] for r in mine if r["step_failed"] is not None)
        diverged = sum(r["reason"] == "diverged" for r in mine)
        text = f"{encoder}: {len(nan)}/{len(mine)} hit NaN"
        if nan:
            text += f" (at steps {', '.join(map(str, nan))})"
        if diverged:
            text += f", {diverged} diverged"
        parts.append(text)
    return "; ".join(parts)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vaepatch demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="./vaepatch-demo", help="folder for the runs, the table and demo.png")
    parser.add_argument("--quick", action="store_true", help="CI size: 2 seeds, 40 steps (under a minute)")
    parser.add_argument("--seeds", type=int, help="seeds per encoder (default 5; --quick 2)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: runs use seeds BASE..BASE+N-1")
    parser.add_argument("--steps", type=int, help="Adam steps per run (default 300; --quick 40)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process and torch thread each")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    steps = args.steps if args.steps is not None else (40 if args.quick else 300)
    if seeds < 1 or steps < 1:
        parser.error("--seeds and --steps must be at least 1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    started = time.perf_counter()
    todo = [(str(out), e, DECODER, s, steps, LR, argv) for s in range(args.seed, args.seed + seeds) for e in ENCODERS]
    desc = f"demo runs (lr {LR}, {steps} steps, decoder {DECODER})"
    if args.jobs <= 1:
        results = [_run_one(job) for job in tqdm(todo, desc=desc)]
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, job) for job in todo]
            results = [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc=desc)]
    wall = time.perf_counter() - started
    steps_run = sum(steps if r["step_failed"] is None else r["step_failed"] + 1 for r in results)

    print(f"\nconv VAE overfitting 10 crops on 0..255, lr {LR}, decoder scale {conv_vae.DECODERS[DECODER]}, "
          f"{steps} steps, seeds {args.seed}..{args.seed + seeds - 1}:\n", flush=True)
    ours = {out / f"{e}-seed{s}" for _, e, _, s, *_ in todo}
    others = [p for p in compare.find_runs([out]) if p not in ours]
    if others:
        print(f"warning: {out} also holds {len(others)} runs from earlier invocations (e.g. {others[0].name}); "
              "they are in the table too. Use a fresh --out to see only these.", file=sys.stderr)
    compare.main([str(out)])
    compare.plot([compare.load_run(p) for p in compare.find_runs([out])], out / "demo.png", right="survival")
    sys.stdout.flush()
    print(f"\n{summary_line(results, ENCODERS)}.")
    print(f"{len(results)} runs, {steps_run} steps in {wall:.0f} s; runs and figure under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
