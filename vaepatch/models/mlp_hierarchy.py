"""The MLP hierarchical VAE of Pervez & Gavves (ICML 2021), where the OU-smoothed prior was shown.

L stochastic layers (default 40-40-40-40, z_1 at the bottom, z_L at the top), every conditional a
two-layer 200-unit tanh MLP followed by a linear head:

    inference   q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})      (bottom-up, each a Normal)
    generative  p(z_L) = N(0, I),  p(z_i | z_{i+1}) Normal,  p(x | z_1) Bernoulli (logits)

Both Normal sides get their scale from a raw head output through a vaepatch parameterization
(the variant's ``posterior`` and ``prior``; a side left to the upstream uses ``exp``), and every
KL is ``vaepatch.gaussian.kl`` on exact log-scales.

With ``variant.ou`` (rho < 1) the training loss uses, for each i < L, the prior p(z_i | z_{i+1})
with its mean and scale averaged over K OU copies of z_{i+1} drawn around its posterior
N(m_{i+1}, s_{i+1}) (``vaepatch.ou.correlated``, all K copies through the prior net in one batched
call). The scale is averaged as sigma, in log space (logsumexp - log K), so a tiny sigma never goes
through log(exp(.)). Nothing else is smoothed: the posterior samples, the data path z_1 -> x and
the fixed top prior are the plain model's. ``evaluate``, ``active_units`` and eval mode always use
the unsmoothed model, which is the model the smoothing is meant to improve.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaepatch import gaussian, scales
from vaepatch import ou as _ou
from vaepatch.variant import OU, Variant

__all__ = ["MLPHierarchy", "count_active", "binarize", "ACTIVE_THRESHOLD", "INITS"]

EXP = scales.get("exp")
ACTIVE_THRESHOLD = 0.01  # Burda et al.'s threshold on Var_x, used by the paper
INITS = ("default", "glorot")  # torch's Linear default; Glorot-uniform weights with zero biases
_ROWS = 10_000  # rows per forward in evaluate / active_units (k copies x images): bounds memory


def _mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_out))


def _as_variant(variant) -> Variant:
    if variant is None:
        return Variant("exp")
    return Variant.parse(variant)


class MLPHierarchy(nn.Module):
    """The paper's MNIST hierarchy; ``variant`` (a Variant or spec, e.g. ``"upbounded1,ou=0.9x5"``)
    picks the posterior / prior scales and the OU smoothing (its ``decoder`` side is unused: pixels
    are Bernoulli)."""

    def __init__(self, x_dim: int = 784, latents=(40, 40, 40, 40), hidden: int = 200, variant=None,
                 init: str = "default"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.variant = _as_variant(variant)
        self.posterior_scale = self.variant.posterior or EXP
        self.prior_scale = self.variant.prior or EXP
        self.ou = self.variant.ou
        self.x_dim, self.latents, self.hidden = int(x_dim), tuple(int(d) for d in latents), int(hidden)
        if not self.latents:
            raise ValueError("need at least one stochastic layer")
        inputs = (self.x_dim,) + self.latents[:-1]
        self.encoders = nn.ModuleList(_mlp(n, 2 * d, hidden) for n, d in zip(inputs, self.latents))
        # priors[i] is p(z_{i+1} | z_{i+2}) in the paper's 1-based names (0-based: layer i given i+1)
        self.priors = nn.ModuleList(_mlp(self.latents[i + 1], 2 * self.latents[i], hidden)
                                    for i in range(len(self.latents) - 1))
        self.decoder = _mlp(self.latents[0], self.x_dim, hidden)
        if init == "glorot":
            # torch's default init shrinks each layer's output variance ~3x through the tanh MLPs, so at the
            # start the posterior means hardly vary with x: the decoder learns the mean image and ignores z
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    # -- the conditionals -------------------------------------------------------------------
    def prior(self, i: int, z_above: torch.Tensor):
        """(mean, log scale) of p(z_i | z_{i+1}) (0-based i < L-1) at ``z_above``."""
        loc, raw = self.priors[i](z_above).chunk(2, dim=-1)
        return loc, self.prior_scale(raw)[1]

    def smoothed_prior(self, i: int, z_above, loc_above, scale_above, option: OU, eps=None):
        """(mean, log scale) of p(z_i | .) averaged over K OU copies of z_{i+1} ~ N(loc_above, scale_above).

        One batched call of the prior net on the K x batch copies; sigma is averaged (not log sigma),
        via logsumexp of the log scales. rho = 1 is exactly ``prior(i, z_above)``.
        """
        if float(option.rho) == 1.0:
            return self.prior(i, z_above)
        k = option.samples
        copies = _ou.correlated(z_above, loc_above, scale_above, option.rho, k, eps)
        loc, log_scale = self.prior(i, copies.flatten(0, 1))
        loc = loc.unflatten(0, (k, -1)).mean(0)
        log_scale = torch.logsumexp(log_scale.unflatten(0, (k, -1)), 0) - math.log(k)
        return loc, log_scale

    def trace(self, x: torch.Tensor, smoothing: OU | None = None):
        """One stochastic pass: per layer (bottom first) a dict with the posterior draw ``z``, its
        ``loc``/``scale``/``log_scale`` and the prior's ``prior_loc``/``prior_log_scale``; and the pixel
        logits. All posterior draws come first, so the random stream of the data path does not
        depend on ``smoothing``."""
        layers, h = [], x
        for encoder in self.encoders:
            loc, raw = encoder(h).chunk(2, dim=-1)
            scale, log_scale = self.posterior_scale(raw)
            h = gaussian.rsample(loc, scale)
            layers.append(dict(z=h, loc=loc, scale=scale, log_scale=log_scale))
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:
                zero = torch.zeros_like(layer["loc"])
                layer["prior_loc"], layer["prior_log_scale"] = zero, zero
                continue
            above = layers[i + 1]
            if smoothing is None:
                p = self.prior(i, above["z"])
            else:
                p = self.smoothed_prior(i, above["z"], above["loc"], above["scale"], smoothing)
            layer["prior_loc"], layer["prior_log_scale"] = p
        return layers, self.decoder(layers[0]["z"])

    @staticmethod
    def _terms(layers, logits, x):
        """(-log p(x | z_1), analytic KL per layer (batch, L)) of one pass."""
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = torch.stack([gaussian.kl(l["loc"], l["log_scale"], l["prior_loc"], l["prior_log_scale"]).sum(-1)
                          for l in layers], dim=-1)
        return recon, kl

    # -- training ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, beta: float = 1.0) -> dict:
        """Training loss (mean negative ELBO, nats per image, the KL terms scaled by ``beta`` for KL
        annealing): smoothed priors in train mode with OU."""
        smoothing = self.ou if (self.training and self.ou is not None) else None
        layers, logits = self.trace(x, smoothing)
        recon, kl = self._terms(layers, logits, x)
        neg_elbo = recon + kl.sum(-1)
        loss = neg_elbo.mean() if beta == 1.0 else (recon + beta * kl.sum(-1)).mean()
        return dict(loss=loss, elbo=-neg_elbo.mean().detach(),
                    kl_per_layer=kl.mean(0).detach(), recon=recon.mean().detach())

    # -- evaluation (always the unsmoothed model) -------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, k: int = 100) -> dict:
        """ELBO (analytic KLs, averaged over the k passes), the importance-weighted bound L_k
        (Burda et al.; L_1 is the ELBO with sampled KLs) and the mean KL per layer, in nats per image."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        chunk = max(1, _ROWS // k)
        elbo, iw, kls, recons = [], [], [], []
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            b = xb.shape[0]
            xr = xb.repeat(k, 1)  # row j * b + n: pass j of image n
            layers, logits = self.trace(xr)
            recon, kl = self._terms(layers, logits, xr)
            log_w = -recon
            for l in layers:
                log_w = log_w + (gaussian.log_prob(l["z"], l["prior_loc"], l["prior_log_scale"])
                                 - gaussian.log_prob(l["z"], l["loc"], l["log_scale"])).sum(-1)
            iw.append(torch.logsumexp(log_w.view(k, b), 0) - math.log(k))
            elbo.append((-recon - kl.sum(-1)).view(k, b).mean(0))
            kls.append(kl.view(k, b, -1).mean(0))
            recons.append(recon.view(k, b).mean(0))
        return dict(elbo=float(torch.cat(elbo).mean()), iw_bound=float(torch.cat(iw).mean()), k=int(k),
                    kl_per_layer=[float(v) for v in torch.cat(kls).mean(0)], recon=float(torch.cat(recons).mean()))

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor, passes: int = 20) -> list:
        """Per layer, the posterior mean of q(z_i | z_{i-1}) in ``passes`` independent stochastic passes
        (lower z's sampled): a list of (passes, N, d_i) tensors."""
        chunk = max(1, _ROWS // passes)
        out = [[] for _ in self.latents]
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            layers, _ = self.trace(xb.repeat(passes, 1))
            for i, l in enumerate(layers):
                out[i].append(l["loc"].view(passes, xb.shape[0], -1))
        return [torch.cat(parts, dim=1) for parts in out]

    def active_units(self, x: torch.Tensor, passes: int = 20, threshold: float = ACTIVE_THRESHOLD) -> dict:
        """Active units per layer, the paper's way and corrected (see ``count_active``)."""
        counts = [count_active(m, threshold) for m in self.posterior_means(x, passes)]
        return dict(paper=[c["paper"] for c in counts], corrected=[c["corrected"] for c in counts],
                    paper_variance=[c["paper_variance"] for c in counts],
                    corrected_variance=[c["corrected_variance"] for c in counts],
                    passes=int(passes), threshold=float(threshold))


def count_active(means: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> dict:
    """Active units of one layer from its posterior means, ``means[p, n]`` = pass p on image n.

    paper: Var_x of the mean from ONE stochastic pass (``means[0]``). Above layer 1 that mean is a
    function of the sampled lower z's, so its variance over x includes Monte-Carlo noise: a unit
    whose mean ignores x but follows the noise counts as active.

    corrected: an unbiased estimate of Var_x(E[mu | x]). The per-image average over the P passes
    still carries noise of variance sigma^2(x) / P, so the mean within-image sample variance
    (unbiased, over the passes) divided by P is subtracted from the variance over x of the averages.
    """
    if means.dim() != 3 or means.shape[0] < 2:
        raise ValueError(f"means must be (passes >= 2, images, units), got {tuple(means.shape)}")
    means = means.double()
    passes = means.shape[0]
    paper = means[0].var(0)
    corrected = means.mean(0).var(0) - means.var(0).mean(0) / passes
    return dict(paper=int((paper > threshold).sum()), corrected=int((corrected > threshold).sum()),
                paper_variance=paper.float(), corrected_variance=corrected.float())


def binarize(images, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli pixels from grey levels (uint8 0..255 or floats in [0, 1]), flattened to (N, D)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.reshape(x.shape[0], -1)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return torch.bernoulli(x, generator=generator)
