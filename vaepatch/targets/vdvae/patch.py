"""The openai/vdvae target: what to replace, built on scales, gaussian and the patch engine.

Upstream treats the raw head outputs ``qv`` (posterior) and ``pv`` (prior) as log sigma and
computes the KL as ``logsigma.exp() ** 2 / logsigma2.exp() ** 2``.  The patch replaces

- ``vae.DecBlock.sample``: q's scale from qv through the posterior parameterization, p's
  from pv through the prior one, z drawn from q, the stable KL;
- ``vae.DecBlock.sample_uncond``: z drawn from p, temperature *multiplying* sigma (upstream
  adds log t to pv, which is only right when log sigma = pv);
- ``gaussian_analytical_kl`` / ``draw_gaussian_diag_samples`` in ``vae_helpers`` and in
  ``vae`` (imported there by value), for callers outside DecBlock: the KL reads its two raw
  scales as (posterior, prior), a draw's raw scale as posterior.

The pixel distribution (discretized mixture of logistics) is left alone.  A side the variant
leaves to "upstream" uses ``exp`` (sigma = exp(raw), log sigma = raw exactly: upstream's own
parameterization) with the stable KL.

With ``ou`` set (Pervez & Gavves), ``vae.Decoder.forward`` is wrapped too, only to mark one
decoder pass: inside it, each block's KL uses a prior whose mean and scale are averaged over K
OU-correlated copies of the previous block's latent, pushed through the deterministic path
between the two (the previous block's ``z_fn`` and ``resnet``, then this block's mixin upsampling
if it has one, then its prior head). The first block, the data path (the real z and the prior's
residual features), the posterior and the pixels are not smoothed; neither is anything run
without gradients or in eval mode, so evaluation and sampling use the plain model.
"""
from __future__ import annotations

import threading
import warnings

import torch

from vaepatch import blockmath, gaussian, scales
from vaepatch.compiled import fused
from vaepatch.patching import Patch
from vaepatch.targets.vdvae.ou import OUSource, split_prior, smoothed_prior

UPSTREAM_SCALE = scales.get("exp")

# fingerprint(owner, attribute) of each replaced original at the pinned commit
# ea35b490313bc33e7f8ac63dd8132f3cc1a729b4 (vaepatch.patching.fingerprint).
FINGERPRINTS = {
    ("vae.DecBlock", "sample"): "efdf5a1f4823ca6d",
    ("vae.DecBlock", "sample_uncond"): "a690a1a7dac4b14b",
    ("vae_helpers", "gaussian_analytical_kl"): "57f0deab5b066994",
    ("vae_helpers", "draw_gaussian_diag_samples"): "4c39ce45cc084d9b",
    ("vae.Decoder", "forward"): "c184cf1d2dbb6302",
}
_pass = threading.local()  # .chain: {"previous": the last block's OUSource} within the current decoder pass


def build(variant, modules, fuse=False):
    """The patches for ``variant`` on the imported upstream ``modules`` (dict name -> module).

    ``fuse=True`` compiles each block's elementwise math (both scales, the draw, the KL; the one node's
    forward and backward) with ``torch.compile``: fused kernels instead of separate passes over memory.
    """
    vae_helpers, vae = modules["vae_helpers"], modules["vae"]
    posterior = variant.posterior or UPSTREAM_SCALE
    prior = variant.prior or UPSTREAM_SCALE
    if variant.decoder is not None:
        warnings.warn(f"variant {variant.name!r} sets a decoder scale ({variant.decoder}), but openai/vdvae's "
                      "pixels are a discretized mixture of logistics, not a Normal: the decoder scale is ignored",
                      stacklevel=3)
    smoothing = variant.ou if variant.ou is not None and variant.ou.rho < 1 else None

    # z ~ q and KL(q || p) from the raw head outputs: all of a block's elementwise math, one autograd node
    # (``vaepatch.blockmath``); fused, the node's forward and backward are compiled and it keeps the same tensors
    block_math = blockmath.block_math(posterior, prior, wrap=fused if fuse else None)

    def sample(self, x, acts):
        """Posterior draw and stable KL for one block (replaces DecBlock.sample)."""
        qm, qv = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        pm, pv, residual = split_prior(self, x)
        chain = getattr(_pass, "chain", None) if smoothing is not None else None
        if chain is None or not (self.training and torch.is_grad_enabled()):
            z, kl = block_math(qm, qv, pm, pv, torch.randn_like(qm))
            return z, x + residual, kl
        q_scale, q_log_scale = posterior(qv)
        z = gaussian.rsample(qm, q_scale)
        previous = chain.get("previous")
        smoothed = smoothed_prior(self, x, previous, smoothing, prior) if previous is not None else None
        p_mean, p_log_scale = smoothed if smoothed is not None else (pm, prior(pv)[1])
        kl = gaussian.kl(qm, q_log_scale, p_mean, p_log_scale)
        chain["previous"] = OUSource(self, x + residual, z, qm, q_scale)
        return z, x + residual, kl

    def decoder_forward(self, *args, **kwargs):
        """Upstream's Decoder.forward, marked as one pass so blocks can reach their predecessor."""
        outer = getattr(_pass, "chain", None)
        _pass.chain = {}
        try:
            return original_decoder_forward(self, *args, **kwargs)
        finally:
            _pass.chain = outer

    original_decoder_forward = vae.Decoder.__dict__["forward"]

    def sample_uncond(self, x, t=None, lvs=None):
        """Prior draw with temperature multiplying sigma (replaces DecBlock.sample_uncond)."""
        pm, pv, residual = split_prior(self, x)
        if lvs is not None:
            return lvs, x + residual
        p_scale, _ = prior(pv)
        if isinstance(t, (list, tuple)):
            raise ValueError("DecBlock.sample_uncond takes one temperature per block; "
                             "pass a list of temperatures to forward_uncond / forward_uncond_samples instead")
        if t is not None:
            p_scale = p_scale * t
        return gaussian.rsample(pm, p_scale), x + residual

    def gaussian_analytical_kl(mu1, mu2, raw1, raw2):
        """KL(q || p) with raw1 read as the posterior's raw scale and raw2 as the prior's."""
        return gaussian.kl(mu1, posterior(raw1)[1], mu2, prior(raw2)[1])

    def draw_gaussian_diag_samples(mu, raw):
        """A draw from N(mu, sigma(raw)), raw read as a posterior raw scale."""
        return gaussian.rsample(mu, posterior(raw)[0])

    fp = lambda owner, attr: FINGERPRINTS[(owner, attr)]  # noqa: E731
    ou_patches = [Patch(vae.Decoder, "forward", decoder_forward, fp("vae.Decoder", "forward"))] if smoothing else []
    return ou_patches + [
        Patch(vae.DecBlock, "sample", sample, fp("vae.DecBlock", "sample")),
        Patch(vae.DecBlock, "sample_uncond", sample_uncond, fp("vae.DecBlock", "sample_uncond")),
        Patch(vae_helpers, "gaussian_analytical_kl", gaussian_analytical_kl,
              fp("vae_helpers", "gaussian_analytical_kl")),
        Patch(vae_helpers, "draw_gaussian_diag_samples", draw_gaussian_diag_samples,
              fp("vae_helpers", "draw_gaussian_diag_samples")),
        # vae.py imported both by value: its own names must be replaced too (fingerprinted above).
        Patch(vae, "gaussian_analytical_kl", gaussian_analytical_kl),
        Patch(vae, "draw_gaussian_diag_samples", draw_gaussian_diag_samples),
    ]
