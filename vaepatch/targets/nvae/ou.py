"""OU-smoothed priors for NVlabs/NVAE (Pervez & Gavves), built from hooks on NVAE's own modules.

In NVAE the prior of group i+1 is ``dec_sampler[i](s)``, where ``s`` is what the decoder tower
made of group i's latent z_i: the combiner cell ``combiner_dec(s_prev, z_i)``, then the tower's
cells up to the next combiner. During one training forward, hooks record that path (which
combiner got which state and latent, which cells followed, every batch norm's input, every
posterior draw ``Normal.sample`` and every flow cell's input) and, when a prior head runs, redo
it for K OU copies of z_i, then average the head's mean (after NVAE's soft clamp) and its sigma
(log-mean-exp) over the copies. The prior ``Normal`` built from that head's output carries the
smoothed parameters; the residual posterior (``--res_dist``), built from the same output, keeps
the real ones (the paper smooths the generative model only).

- Copies are drawn where z_i was drawn: in the posterior's base space N(mu, sigma), then pushed
  through the same flow cells (``--num_nf``) with the same features.
- Batch norm: every decoder cell normalizes with batch statistics. The copies are normalized
  with the real batch's statistics at each layer (recomputed from the recorded input, gradients
  kept), so a copy meets the same function of its latent as the real sample did, and no running
  statistic moves. In a multi-process run these are this process's statistics (SyncBatchNorm
  averages them over processes), so the smoothed function differs from the real one there by the
  spread between processes' batch statistics.
- The top group's prior N(0, I), the posterior, the pixels, evaluation (``model.eval()``) and
  anything run without gradients use the plain model.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from vaepatch import ou

__all__ = ["Parts", "Source", "smoothed_prior", "smoothing", "current"]

_local = threading.local()  # .current: the _Pass of the training forward running in this thread


@dataclass
class Source:
    """What a prior head's input was made from, enough to remake it for other latents."""

    z0: torch.Tensor  # the base draw of z_i (before flows), from N(loc, scale)
    loc: torch.Tensor
    scale: torch.Tensor
    flows: list  # [(flow cell, its features)] applied to z0 in order
    combiner: torch.nn.Module  # combiner_dec cell that took (state, z_i)
    state: torch.Tensor
    cells: list  # decoder-tower cells between that combiner and the prior head
    norm_inputs: dict = field(repr=False)  # batch norm module -> its input in the real pass


def _repeat(t, samples):
    return t.repeat(samples, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class Parts:
    """The NVAE pieces the smoothing calls or must recognise (from the imported clone)."""

    soft_clamp: object  # distributions.soft_clamp5: NVAE's clamp of every Normal's mean
    swish_batch_norm: type | None = None  # thirdparty SyncBatchNormSwish: batch norm, then swish
    batch_norm_wrapper: type | None = None  # neural_operations.SyncBatchNorm: holds an nn.SyncBatchNorm as .bn


def _norm_layers(modules, parts):
    """Every batch-norm layer called inside ``modules``: (the module called, the module holding
    the affine parameters, whether swish follows). NVAE's wrapper counts as the layer, not the
    nn.SyncBatchNorm inside it (on CPU vaepatch's cpu-sync-batchnorm shim runs that one without its hooks)."""
    found = [m for module in modules for m in module.modules()]
    wrapper = parts.batch_norm_wrapper
    wrapped = {id(m.bn) for m in found if wrapper is not None and isinstance(m, wrapper)}
    layers = []
    for m in found:
        if wrapper is not None and isinstance(m, wrapper):
            layers.append((m, m.bn, False))
        elif isinstance(m, _BatchNorm) and id(m) not in wrapped:
            swish = parts.swish_batch_norm is not None and isinstance(m, parts.swish_batch_norm)
            layers.append((m, m, swish))
    return layers


def _normalize(norm, mean, var, swish, x):
    """``norm``'s batch norm of ``x`` with given batch statistics (then swish, if it fuses one).

    The statistics and the affine parameters are folded into one per-channel scale and shift, so
    the full-size tensor sees one multiply-add (and one SiLU): few activations kept for backward.
    """
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    y = torch.addcmul(shift.view(shape), x, scale.view(shape))
    if swish:
        y = F.silu(y)
    return y.to(x.dtype)


@contextlib.contextmanager
def _real_batch_statistics(modules, norm_inputs, parts):
    """Within the block, every batch norm inside ``modules`` normalizes with the statistics of the
    input it had in the real pass (an instance-level ``forward``, removed on exit)."""
    layers = _norm_layers(modules, parts)
    own = {m: vars(m)["forward"] for m, _, _ in layers if "forward" in vars(m)}  # put back exactly
    try:
        for m, norm, swish in layers:
            if m not in norm_inputs:
                raise RuntimeError(f"OU smoothing: the batch norm {m!r} on the path to a prior did not run in "
                                   "the training forward, so its batch statistics are unknown")
            x = norm_inputs[m]
            var, mean = torch.var_mean(x.float(), dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
            m.forward = lambda x, norm=norm, mean=mean, var=var, swish=swish: _normalize(norm, mean, var, swish, x)
        yield
    finally:
        for m, _, _ in layers:
            vars(m).pop("forward", None)
            if m in own:
                vars(m)["forward"] = own[m]


def smoothed_prior(source, head, option, prior, parts, eps=None):
    """(mean, sigma, log sigma) of ``head``'s prior averaged over K OU copies of the latent.

    ``head`` is a ``dec_sampler`` entry, run without hooks: its raw scale goes through ``prior``
    here, its mean through NVAE's soft clamp (``parts``). ``eps`` (``(K, *z0.shape)``) fixes the noise.
    """
    samples = option.samples
    z = ou.correlated(source.z0, source.loc, source.scale, option.rho, samples, eps).flatten(0, 1)
    for cell, features in source.flows:
        z, _ = cell(z, _repeat(features, samples))
    modules = [source.combiner, *source.cells]
    with _real_batch_statistics(modules, source.norm_inputs, parts):
        s = source.combiner(_repeat(source.state, samples), z)
        for cell in source.cells:
            s = cell(s)
        mean, raw = torch.chunk(head.forward(s), 2, dim=1)
    unflatten = lambda t: t.reshape(samples, -1, *t.shape[1:])  # noqa: E731
    mean = unflatten(parts.soft_clamp(mean)).mean(0)
    log_sigma = torch.logsumexp(unflatten(prior(raw)[1]), 0) - math.log(samples)
    return mean, torch.exp(log_sigma), log_sigma


class _Pass:
    """The records of one training forward, and the smoothed prior of each head output."""

    def __init__(self, option, prior, parts):
        self.option, self.prior, self.parts = option, prior, parts
        self.thread = threading.get_ident()
        self.copying = False
        self.draws = {}  # id(z) -> (z, loc, scale): posterior draws
        self.flows = {}  # id(z out) -> (z out, cell, z in, features)
        self.norm_inputs = {}  # batch norm -> input
        self.combiner = None  # (cell, state, z) of the last combiner_dec call
        self.cells = []  # tower cells run since then
        self.smoothed = {}  # id(head output) -> (head output, (mean, sigma, log sigma))

    def active(self):
        return not self.copying and threading.get_ident() == self.thread

    def record_draw(self, z, loc, scale):
        if self.active():
            self.draws[id(z)] = (z, loc, scale)

    def source(self):
        cell, state, z = self.combiner
        flows = []
        while id(z) in self.flows and self.flows[id(z)][0] is z:
            _, flow, z, features = self.flows[id(z)]
            flows.insert(0, (flow, features))
        draw = self.draws.get(id(z))
        if draw is None or draw[0] is not z:
            raise RuntimeError("OU smoothing: the latent fed to a combiner cell is neither a posterior draw "
                               "(Normal.sample) nor a flow cell's output; this NVAE forward is not the one "
                               "vaepatch knows")
        return Source(z, draw[1], draw[2], flows, cell, state, list(self.cells), self.norm_inputs)

    # hooks
    def tower_cell(self, cell, args):
        if not self.active():
            return
        if getattr(cell, "cell_type", None) == "combiner_dec":
            self.combiner, self.cells = (cell, args[0], args[1]), []
        elif self.combiner is not None:
            self.cells.append(cell)

    def batch_norm(self, module, args):
        if self.active():
            self.norm_inputs[module] = args[0]

    def flow_cell(self, cell, args, output):
        if self.active():
            self.flows[id(output[0])] = (output[0], cell, args[0], args[1])

    def prior_head(self, head, args, output):
        if not self.active() or self.combiner is None:
            return
        self.copying = True
        try:
            smoothed = smoothed_prior(self.source(), head, self.option, self.prior, self.parts)
        finally:
            self.copying = False
        self.smoothed[id(output)] = (output, smoothed)

    def smoothed_for(self, mean):
        """The smoothed (mean, sigma, log sigma) if ``mean`` is a view of a smoothed head's output."""
        entry = self.smoothed.get(id(getattr(mean, "_base", None)))
        return entry[1] if entry is not None and entry[0] is mean._base else None


def current():
    """The training forward's _Pass in this thread, or None."""
    return getattr(_local, "current", None)


@contextlib.contextmanager
def smoothing(model, option, prior, parts):
    """For one ``AutoEncoder.forward``: record the decoder's path and smooth each prior head.

    Enter it after the heads' own hooks are registered: the prior-head hook must see their output.
    """
    state = _Pass(option, prior, parts)
    handles = [cell.register_forward_pre_hook(state.tower_cell) for cell in model.dec_tower]
    handles += [m.register_forward_pre_hook(state.batch_norm) for m, _, _ in _norm_layers(model.dec_tower, parts)]
    handles += [cell.register_forward_hook(state.flow_cell) for cell in getattr(model, "nf_cells", ())]
    handles += [head.register_forward_hook(state.prior_head) for head in model.dec_sampler]
    outer, _local.current = current(), state
    try:
        yield state
    finally:
        _local.current = outer
        for handle in handles:
            handle.remove()
