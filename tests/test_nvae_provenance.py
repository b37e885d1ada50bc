"""Failure provenance on the real NVlabs/NVAE: a fault injected into one known prior head shows up in
the event's ``where``, and the observers leave a vanilla run bit-identical. Needs the clone."""
import pytest
import torch

import vaepatch
from vaepatch.runs import events
from tests.nvae_support import cifar_like, nvae_clone, tiny_model

CLONE, WHY_NOT = nvae_clone()
pytestmark = pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")
FAULT_HEAD, FAULT_STEP = 1, 2  # dec_sampler[1] is group 2's prior head


@pytest.fixture(autouse=True)
def _clean(nvae):
    vaepatch.revert("nvae")
    yield
    vaepatch.revert("nvae")


def _train(tmp_path, variant, steps, fault_value=None, provenance=True):
    """NVAE's train() step by NVAE's own functions (forward, reconstruction loss, KL balancer,
    grad scaler), through the launcher's step recorder; returns the losses and the events."""
    import utils

    from vaepatch.targets.nvae.patch import UPSTREAM_SCALE
    from vaepatch.targets.nvae.recorder import StepRecorder, recording_scaler

    handle = vaepatch.apply(variant, target="nvae")
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    sides = (handle.variant.posterior or UPSTREAM_SCALE, handle.variant.prior or UPSTREAM_SCALE)
    recorder = StepRecorder(scales=sides, provenance=provenance)
    recorder.open(tmp_path / "events.jsonl", rank=0)
    scaler = recording_scaler(torch.amp.GradScaler, recorder)("cpu", enabled=False)
    reconstruction_loss = recorder.reconstruction_loss(utils.reconstruction_loss)
    alpha_i = utils.kl_balancer_coeff(num_scales=model.num_latent_scales, groups_per_scale=model.groups_per_scale,
                                      fun="square")
    losses = []

    def train(queue, model, optimizer, grad_scalar, global_step):
        for step, x in enumerate(queue):
            hook = None
            if fault_value is not None and step == FAULT_STEP:
                def fault(module, inputs, out):
                    mean, raw = out.chunk(2, dim=1)
                    return torch.cat([mean, torch.full_like(raw, fault_value)], dim=1)
                hook = model.dec_sampler[FAULT_HEAD].register_forward_hook(fault, prepend=True)
            torch.manual_seed(50 + step)
            optimizer.zero_grad()
            logits, _, _, kl_all, _ = model(x)
            recon = reconstruction_loss(model.decoder_output(logits), x, crop=model.crop_output)
            balanced_kl, _, _ = utils.kl_balancer(kl_all, 1.0, kl_balance=True, alpha_i=alpha_i)
            loss = torch.mean(recon + balanced_kl)
            losses.append(float(loss))
            grad_scalar.scale(loss).backward()
            grad_scalar.step(optimizer)
            grad_scalar.update()
            if hook is not None:
                hook.remove()
        return global_step

    recorder.train(train)([cifar_like(2, seed=s) for s in range(steps)], model, optimizer, scaler, 0)
    recorder.close()
    return losses, events.read(tmp_path).events


@pytest.mark.parametrize("variant, fault, cause", [
    ("vanilla", float("nan"), "prior raw scale non-finite"),  # NVAE soft-clamps log sigma: only NaN gets through
    ("explin", -1000.0, "prior sigma underflow"),
])
def test_injected_prior_fault_is_named_in_the_event(tmp_path, variant, fault, cause):
    _, log = _train(tmp_path, variant, FAULT_STEP + 1, fault_value=fault)
    good, bad = log[FAULT_STEP - 1], log[FAULT_STEP]
    assert good["finite"] and "where" not in good and good["kl"] > 0 and good["recon"] > 0
    assert not bad["finite"] and "kl" in bad["nonfinite"]
    where = bad["where"]
    assert (where["group"], where["label"]) == (FAULT_HEAD + 1, f"group {FAULT_HEAD + 1}")
    assert where["cause"] == cause and where["groups_nonfinite"] == 1
    assert bad["where"]["posterior"]["raw"][0] is not None  # the posterior side of that group is reported too


def test_observers_leave_a_vanilla_run_bit_identical(tmp_path):
    watched, log = _train(tmp_path / "a", "vanilla", 3, provenance=True)
    plain, _ = _train(tmp_path / "b", "vanilla", 3, provenance=False)
    assert watched == plain
    assert [e["loss"] for e in log] == pytest.approx(watched, rel=1e-6)
