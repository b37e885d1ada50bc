"""The Efficient-VDVAE target: what to replace, built on scales, gaussian and the patch engine.

Every latent Normal comes out of a ``GaussianLatentLayer``: a 1x1 projection to (mean, raw scale), then
sigma = softplus(beta raw) / beta (``distribution_base = 'std'``; beta = ``gradient_smoothing_beta``, ln 2
by default: its "gradient smoothing") or sigma = exp(beta raw) (``'logstd'``). Each ``LevelBlockDown`` asks
its prior layer (``get_analytical_distribution`` in training, ``sampler`` when sampling) and its posterior
layer (``sampler``), the posterior with the prior's stats when ``use_residual_distribution`` is on: then
mu_q = mu_p + mean and sigma_q = sigma(raw) * sigma_p, as NVAE's residual Normal. ``KLDivergence`` (posterior
p, prior q) computes the KL from sigma ratios (``calculate_std_loss`` / ``calculate_logstd_loss``). The patch
replaces

- ``LevelBlockDown.sampler`` / ``get_analytical_distribution``: the block knows which layer is its prior, so
  the raw scale goes through the prior parameterization there and through the posterior one elsewhere; with
  the residual posterior ``log sigma_q = log sigma_p + log sigma(raw_q)``, sigma(raw_q) from the *posterior*
  parameterization (as the NVAE target maps NVAE's): ``log sigma_q - log sigma_p`` in the KL is exactly that
  log, and a constant prior leaves q's scale to the posterior layer alone. The mean stays upstream's;
  temperature multiplies sigma (as upstream);
- ``GaussianLatentLayer.forward``, for callers outside a block: its raw scale read as a posterior's;
- ``calculate_std_loss`` / ``calculate_logstd_loss``: the stable KL (``vaepatch.gaussian.kl``) on exact log
  sigmas.

The stats a layer returns keep upstream's form (``[mean, std]``, or ``[mean, logstd]`` in 'logstd' mode) for
every other reader (synthesize.py's encoder), as a list that also carries the exact sigma and log sigma
(:class:`Stats`). A side the variant leaves to "upstream" uses upstream's own parameterization, read from the
loaded configuration at each call (softplus(beta) or exp(beta raw)), with the stable KL. The pixels (a
discretized mixture of logistics with a softplus scale of its own) are left alone. ``fuse=True`` compiles
the KL. OU smoothing is not implemented for this target.
"""
from __future__ import annotations

import functools
import warnings

import torch

from vaepatch import gaussian, scales
from vaepatch.compiled import fused
from vaepatch.patching import Patch

__all__ = ["FINGERPRINTS", "Stats", "upstream_scale", "build"]

# fingerprint(owner, attribute) of each original at the pinned tree 65d617e6 (efficient_vdvae_torch/ of
# f779c40f24bbd69129bf477593baf4792f05147e; vaepatch.patching.fingerprint). The last four are not replaced,
# only relied on (how a block calls its layers, upstream's sigma, which argument of the KL is the prior):
# they are checked by re-setting the same object.
FINGERPRINTS = {
    ("model.layers.LevelBlockDown", "sampler"): "f4de2fd9de57ad5e",
    ("model.layers.LevelBlockDown", "get_analytical_distribution"): "ea4e6167fa46a44b",
    ("model.latent_layers.GaussianLatentLayer", "forward"): "f8e24075570af8dc",
    ("model.losses", "calculate_std_loss"): "e415321fc7ff4bf6",
    ("model.losses", "calculate_logstd_loss"): "434764a17150371d",
    ("model.layers.LevelBlockDown", "forward"): "a6cbe818ceb78b63",
    ("model.latent_layers", "_std_mode"): "958db772e29a20e7",
    ("model.latent_layers", "_logstd_mode"): "dfc63c86ef0498dd",
    ("model.losses.KLDivergence", "forward"): "2dae251e724abbdb",
}


class Stats(list):
    """A layer's stats in upstream's form (``[mean, std]`` or ``[mean, logstd]``), with ``sigma`` and the exact
    ``log_sigma`` the patched KL and the residual posterior read."""

    sigma: torch.Tensor
    log_sigma: torch.Tensor


class _ScaledExp:
    """Upstream's 'logstd' base: sigma = exp(beta raw), log sigma = beta raw exactly."""

    def __init__(self, beta: float):
        self.beta, self.spec = beta, f"exp({beta!r} raw)"

    def __call__(self, raw):
        log_sigma = self.beta * raw
        return torch.exp(log_sigma), log_sigma


def upstream_scale(hparams):
    """Upstream's own parameterization under the loaded configuration ``hparams``."""
    return _upstream_scale(hparams.model.distribution_base, float(hparams.model.gradient_smoothing_beta))


@functools.lru_cache(maxsize=8)
def _upstream_scale(base: str, beta: float):
    if base == "std":
        return scales.get(f"softplus({beta!r})")
    if base == "logstd":
        return _ScaledExp(beta)
    raise ValueError(f"distribution base {base!r} not known to vaepatch (Efficient-VDVAE has 'std' and 'logstd')")


def build(variant, modules, fuse=False):
    """The patches for ``variant`` on the imported upstream ``modules`` (dict name -> module)."""
    latent_layers, layers, losses = modules["model.latent_layers"], modules["model.layers"], modules["model.losses"]
    hparams = latent_layers.hparams  # the configuration the modules hold (read at each call: tests change it)
    if variant.decoder is not None:
        warnings.warn(f"variant {variant.name!r} sets a decoder scale ({variant.decoder}), but Efficient-VDVAE's "
                      "pixels are a discretized mixture of logistics, not a Normal: the decoder scale is ignored",
                      stacklevel=3)
    if variant.ou is not None and variant.ou.rho < 1:
        raise ValueError(f"variant {variant.name!r} smooths the prior (ou = {variant.ou.spec}), which vaepatch does "
                         "not implement for Efficient-VDVAE; use it on vdvae or nvae, or a variant without ou")
    kl_math = fused(gaussian.kl) if fuse else gaussian.kl

    def side(is_prior: bool):
        chosen = variant.prior if is_prior else variant.posterior
        return chosen if chosen is not None else upstream_scale(hparams)

    def stats(mean, sigma, log_sigma) -> Stats:
        logstd = hparams.model.distribution_base == "logstd"
        out = Stats([mean, log_sigma / float(hparams.model.gradient_smoothing_beta) if logstd else sigma])
        out.sigma, out.log_sigma = sigma, log_sigma
        return out

    def log_sigma_of(s):
        """A stats list's exact log sigma; one built by the unpatched layer only has upstream's form."""
        if isinstance(s, Stats):
            return s.log_sigma
        if hparams.model.distribution_base == "logstd":
            return float(hparams.model.gradient_smoothing_beta) * s[1]
        return torch.log(s[1])

    def latent(layer, y, prior_stats, temperature, is_prior, sample=True):
        """(z, stats), or the stats alone: one latent layer's Normal from its raw output, patched."""
        mean, raw = torch.chunk(layer.projection(y), chunks=2, dim=1)
        sigma, log_sigma = side(is_prior)(raw)
        if prior_stats is not None:  # the residual posterior: mu_p + mean, sigma_p * sigma(raw)
            mean = mean + prior_stats[0]
            prior_sigma = prior_stats.sigma if isinstance(prior_stats, Stats) else torch.exp(log_sigma_of(prior_stats))
            sigma, log_sigma = sigma * prior_sigma, log_sigma + log_sigma_of(prior_stats)
        out = stats(mean, sigma, log_sigma)
        if not sample:
            return out
        if temperature is not None:
            sigma = sigma * temperature
        eps = torch.empty_like(mean).normal_(0., 1.)  # upstream's draw (calculate_z), on the mean's device
        return eps * sigma + mean, out

    def sampler(self, latent_fn, y, prior_stats=None, temperature=None):
        """A draw and the stats from ``latent_fn``, its side known to the block (replaces LevelBlockDown.sampler)."""
        return latent(latent_fn, y, prior_stats, temperature, latent_fn is getattr(self, "prior_layer", None))

    def get_analytical_distribution(self, latent_fn, y, prior_stats=None):
        """The stats alone (replaces LevelBlockDown.get_analytical_distribution)."""
        is_prior = latent_fn is getattr(self, "prior_layer", None)
        return None, latent(latent_fn, y, prior_stats, None, is_prior, sample=False)

    def layer_forward(self, x, temperature=None, prior_stats=None, return_sample=True):
        """A layer called by other code: its raw scale read as a posterior's (replaces GaussianLatentLayer.forward)."""
        return latent(self, x, prior_stats, temperature, False, sample=return_sample)

    def kl(p, q):
        """KL(p || q) of a posterior's stats ``p`` and a prior's ``q``, the stable form on exact log sigmas
        (replaces calculate_std_loss and calculate_logstd_loss)."""
        return kl_math(p[0], log_sigma_of(p), q[0], log_sigma_of(q))

    def fp(owner, attribute):
        return FINGERPRINTS[(f"{owner.__module__}.{owner.__qualname__}" if isinstance(owner, type) else owner.__name__,
                             attribute)]

    def relied_on(owner, attribute):
        return Patch(owner, attribute, vars(owner)[attribute], fp(owner, attribute))

    block, layer = layers.LevelBlockDown, latent_layers.GaussianLatentLayer
    return [
        Patch(block, "sampler", sampler, fp(block, "sampler")),
        Patch(block, "get_analytical_distribution", get_analytical_distribution,
              fp(block, "get_analytical_distribution")),
        Patch(layer, "forward", layer_forward, fp(layer, "forward")),
        Patch(losses, "calculate_std_loss", kl, fp(losses, "calculate_std_loss")),
        Patch(losses, "calculate_logstd_loss", kl, fp(losses, "calculate_logstd_loss")),
        relied_on(block, "forward"), relied_on(latent_layers, "_std_mode"), relied_on(latent_layers, "_logstd_mode"),
        relied_on(losses.KLDivergence, "forward"),
    ]
