"""A tiny configuration of the real Efficient-VDVAE (its CIFAR-10 baseline made small), for tests and benches.

Seven top-down blocks (one at 2x2, then two at each of 8x8, 16x16 and 32x32; the bottom-up half mirrors them,
its last block after the 4x pooling as upstream's), 16 channels, 4 latents per block, one middle layer per
residual cell, 10 logistics per pixel as upstream, batch 16; upstream's own defaults
otherwise: softplus(ln 2) scales, no residual posterior, Adamax, cosine schedule with 100 warm-up steps, the
KL's beta and gamma schedules, the gradient-norm skip at 800. Evaluation only after the first step (upstream
evaluates at step 0), on 16 images.
"""
from __future__ import annotations

from pathlib import Path

from vaepatch import cifar_format

__all__ = ["TINY", "TRAIN_ARGS", "BATCH", "SKIP_POLICIES", "threshold_args", "make_data", "run_args"]

BATCH = 16
N_VAL = 16  # validation images (Efficient-VDVAE validates on the first half of CIFAR-10's test batch)
TINY = {
    "run.name": "tiny",  # hparams reads run.name as written (no quotes)
    "model.input_conv_filters": "16",
    "model.up_strides": "[1, 2, 1, 2, 1, 4, 1]", "model.up_n_blocks_per_res": "[0] * 7",
    "model.up_n_blocks": "[1] * 7", "model.up_n_layers": "[1] * 7", "model.up_filters": "[16] * 7",
    "model.up_mid_filters_ratio": "[0.5] * 7", "model.up_kernel_size": "[3] * 6 + [1]",
    "model.up_skip_filters": "[16] * 7",
    "model.down_strides": "[1, 4, 1, 2, 1, 2, 1]", "model.down_n_blocks_per_res": "[0] * 7",
    "model.down_n_blocks": "[1] * 7", "model.down_n_layers": "[1] * 7", "model.down_filters": "[16] * 7",
    "model.down_mid_filters_ratio": "[0.5] * 7", "model.down_kernel_size": "[1] + [3] * 6",
    "model.down_latent_variates": "[4] * 7",
    "train.batch_size": str(BATCH), "val.batch_size": str(BATCH), "val.n_samples_for_validation": str(N_VAL),
    "train.checkpoint_and_eval_interval_in_steps": "1000000000",
}
TRAIN_ARGS = [f"{key}={value}" for key, value in TINY.items()]  # `vaepatch run effvdvae ... -- <these>`
# The stability-margin bench's skip policies: config overrides for each. Efficient-VDVAE skips an update
# whose gradient norm is NaN or at least optimizer.gradient_skip_threshold (800); gradient_skip = False turns
# the rule off, and then a step with a NaN loss is applied too (upstream has no other guard).
SKIP_POLICIES = {"upstream": [], "off": ["optimizer.gradient_skip=False"]}


def threshold_args(threshold: float) -> list:
    """Config overrides that skip an update whose gradient norm is at least ``threshold`` (the skip-counts
    bench's calibrated rule)."""
    return ["optimizer.gradient_skip=True", f"optimizer.gradient_skip_threshold={float(threshold)!r}"]


def make_data(dest, steps: int, batch_size: int = BATCH):
    """A CIFAR-format dataset (``vaepatch make-data --for effvdvae``) with one epoch longer than ``steps``
    batches, and a test batch twice the validation set (Efficient-VDVAE validates on its first half)."""
    if not (Path(dest) / cifar_format.FOLDER / "test_batch").exists():
        cifar_format.make(dest, n_train=batch_size * (steps + 1), n_test=2 * N_VAL, for_target="effvdvae")
    return Path(dest)


def run_args(run_dir, data, seed: int, lr: float, port: int) -> tuple[list, list]:
    """(``vaepatch run effvdvae`` options, config overrides) for the tiny model at ``lr``. Its checkpoint and
    TensorBoard logs go into the run folder; ``port`` is unused (each run picks a free one)."""
    return ["--data", str(data)], [*TRAIN_ARGS, f"optimizer.learning_rate={float(lr)!r}", f"run.seed={int(seed)}"]
