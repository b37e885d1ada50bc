"""The NVlabs/NVAE target: what to replace, built on scales, gaussian and the patch engine.

NVAE builds every Normal through one class, ``distributions.Normal(mu, log_sigma, temp)``
(imported by value into ``model.py``), for the posteriors, the priors, the fixed top prior
``Normal(0, log_sigma=0)``, temperature sampling and ``NormalDecoder`` (pixels). Upstream
soft-clamps mu and log sigma to +-5, adds 0.01 to sigma, stores only sigma and takes
``log(sigma)`` / ``log(sigma_q / sigma_p)`` in ``log_p`` / ``kl``. The patch replaces

- ``distributions.Normal.__init__``: keeps upstream's soft clamp of mu, and stores sigma *and*
  an exact log sigma (``self.sigma``, ``self.log_sigma``); temperature multiplies sigma;
- ``distributions.Normal.log_p`` / ``Normal.kl``: ``vaepatch.gaussian.log_prob`` / ``kl`` on
  (mu, log sigma), each one autograd node (``vaepatch.blockmath``): no log of sigma, no log of a
  ratio. The flow path (``num_nf > 0``, where the KL is ``log_q - log_p``) goes through ``log_p``
  and is covered by it;
- ``distributions.NormalDecoder.__init__`` (wrapped): its Normal takes the variant's ``decoder``
  scale from the raw output;
- ``model.AutoEncoder.forward`` / ``AutoEncoder.sample`` (wrapped): for the duration of the
  call, forward hooks on the model's own heads map each head's raw scale half to an exact
  log sigma -- ``enc_sampler[i]`` (posterior) through the posterior parameterization,
  ``dec_sampler[i]`` (prior) through the prior one -- and Normals built inside the call read
  their ``log_sigma`` argument as that exact log sigma.

- with a constant side (``-cst1`` variants), NVAE's weight normalization ``normalize_weight_jit`` (in
  ``neural_operations`` and ``neural_ar_operations``): the same value, a gradient of 0 instead of NaN at
  an all-zero filter (:func:`safe_normalize_weight`: why a constant prior makes one).

Side information therefore comes from the heads, not from a copy of NVAE's model code. What
follows from it inside ``forward`` / ``sample``:

- posterior ``Normal(mu_q, log_sig_q)``: sigma from the posterior parameterization;
- prior ``Normal(mu_p, log_sig_p)``: sigma from the prior parameterization;
- fixed top prior ``Normal(0, 0)``: log sigma = 0, so exactly N(0, 1) under every variant
  (upstream gives sigma = 1.01; UpBounded1 on raw 0 would give 0.5);
- residual posterior ``Normal(mu_p + mu_q, log_sig_p + log_sig_q)`` (``--res_dist``): NVAE's
  own sum now adds two exact logs, ``log sigma_q = log sigma_p(raw_p) + log dsigma(raw_q)``,
  i.e. sigma_q = sigma_p * dsigma with dsigma from the *posterior* parameterization -- the
  residual Normal of the NVAE paper (eq. 2), combined in log-sigma space. Then
  ``log sigma_q - log sigma_p`` in the KL is exactly ``log dsigma``, and a constant prior scale
  leaves q's scale to the posterior head alone. (Upstream instead soft-clamps the sum of the
  two raw outputs; the mean stays as upstream: ``soft_clamp5(mu_p + mu_q)``.)

A side the variant leaves to "upstream" uses NVAE's own parameterization, ``softclamp``
(sigma = exp(5 tanh(p / 5)) + 0.01 exactly, with its log in closed form), and still the stable
KL. A Normal built outside ``forward`` / ``sample`` / ``NormalDecoder`` (none in NVAE itself)
reads its raw scale through the posterior parameterization. The discretized-logistic pixel
decoders (``DiscLogistic``, ``DiscMixLogistic``) are left alone, and so are ``Normal.sample``
and ``sample_given_eps`` (they only read ``self.mu`` / ``self.sigma``).

``fuse=True`` compiles (``vaepatch.compiled.fused``) the math of each head's mapping to log sigma, of the
KL and of the log density (each node's forward and backward): on a GPU a few fused kernels per group
instead of one launch per elementwise pass, and the same tensors kept for backward as eager.

With ``ou`` set (Pervez & Gavves), each training forward also records the decoder's path with
hooks and gives every prior Normal but the top one its OU-smoothed mean and scale
(``vaepatch.targets.nvae.ou``); ``Normal.sample`` is then wrapped only to record the posterior
draws the smoothing starts from.
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import warnings
import weakref

import torch

from vaepatch import blockmath, scales
from vaepatch.compiled import fused
from vaepatch.patching import Patch, PatchError
from vaepatch.targets.nvae import ou as nvae_ou

UPSTREAM_SCALE = scales.get("softclamp")

# fingerprint(owner, attribute) of each replaced original at the pinned commit
# 9fc1a288fb831c87d93a4e2663bc30ccf9225b29 (vaepatch.patching.fingerprint).
FINGERPRINTS = {
    ("distributions.Normal", "__init__"): "e67a3109e11807fa",
    ("distributions.Normal", "log_p"): "90499ac06f17cdf0",
    ("distributions.Normal", "kl"): "d1b07bb0da3cb7fa",
    ("distributions.NormalDecoder", "__init__"): "9f080ec20115223b",
    ("model.AutoEncoder", "forward"): "e6d70f07361bd465",
    ("model.AutoEncoder", "sample"): "dd40de22aa3daaa5",
    ("distributions.Normal", "sample"): "c55046af838500f7",
    ("neural_operations", "normalize_weight_jit"): "e3f3d85332374699",
}

_state = threading.local()  # .depth: AutoEncoder calls running in this thread; .decoder: NormalDecoder's scale
_hooks_lock = threading.Lock()
_hooked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # head module -> [hook handle, users]


def _layout(x):
    """``x``'s memory format: channels_last where it is laid out so (and not also plain contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _head_map(scale, fuse):
    """(mean, raw scale) head output -> (mean, exact log sigma) under ``scale``. Log sigma is one node keeping
    only its derivative (``blockmath.log_scale_math``; autograd's form kept the head output and the form's
    intermediates, more than vanilla keeps), its math compiled with ``fuse``."""
    log_sigma = blockmath.log_scale_math(scale, wrap=fused if fuse else None)

    def head_map(output):
        mean, raw = torch.chunk(output, 2, dim=1)
        mapped = torch.cat([mean, log_sigma(raw)], dim=1)
        # In the head output's memory layout (NVAE runs channels_last), as vanilla keeps it: some forms'
        # ops return contiguous tensors, and the convolutions downstream round differently per layout.
        return mapped.contiguous(memory_format=_layout(output))

    return head_map


def _head_hook(head_map):
    """Forward hook replacing a head's output by ``head_map`` of it."""

    def hook(module, inputs, output):
        return head_map(output)

    return hook


@contextlib.contextmanager
def _mapped_heads(model, posterior, prior):
    """Within the block: ``model``'s posterior and prior heads output exact log sigmas (``posterior``,
    ``prior``: :func:`_head_map` of each side's scale).

    Hooks are registered on the heads of this one model for the duration only (a nested or
    concurrent call on the same model shares them), and removed on exit.
    """
    heads = [(head, posterior) for head in getattr(model, "enc_sampler", ())]
    heads += [(head, prior) for head in getattr(model, "dec_sampler", ())]
    with _hooks_lock:
        for head, head_map in heads:
            entry = _hooked.get(head)
            if entry is None:
                _hooked[head] = [head.register_forward_hook(_head_hook(head_map)), 1]
            else:
                entry[1] += 1
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        with _hooks_lock:
            for head, _ in heads:
                entry = _hooked.get(head)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] == 0:
                    entry[0].remove()
                    del _hooked[head]


def _temper(scale, log_scale, t):
    """Temperature multiplies sigma (and adds log t to log sigma)."""
    if isinstance(t, torch.Tensor):
        return scale * t, log_scale + torch.log(t)
    if t < 0:
        raise ValueError(f"NVAE temperature must be >= 0 (it multiplies sigma), got {t!r}")
    return scale * t, log_scale + (math.log(t) if t > 0 else -math.inf)


def safe_normalize_weight(log_weight_norm, weight):
    """NVAE's weight normalization, exp(log g) * w / (||w|| + 1e-5) per output filter, with a norm whose
    gradient at an all-zero filter is 0 (``torch.linalg.vector_norm``) where sqrt(sum w^2) gives NaN.

    Needed under a constant prior: the prior heads' scale filters then get no gradient from the loss,
    only NVAE's weight decay, which shrinks them until w^2 underflows; sqrt's gradient at 0 is infinite,
    times 0 is NaN, and NVAE applies that update (seen on the tiny NVAE at lr 0.1 after ~930 steps, in
    every seed). The same value elsewhere."""
    norm = torch.linalg.vector_norm(weight, dim=(1, 2, 3)).view(-1, 1, 1, 1)
    return torch.exp(log_weight_norm) * weight / (norm + 1e-5)


def _log_sigma(dist):
    """A Normal's exact log sigma; one built before the patch only has sigma."""
    log_sigma = vars(dist).get("log_sigma")
    return log_sigma if log_sigma is not None else torch.log(dist.sigma)


def build(variant, modules, fuse=False):
    """The patches for ``variant`` on the imported upstream ``modules`` (dict name -> module)."""
    distributions, model = modules["distributions"], modules["model"]
    smoothing = variant.ou if variant.ou is not None and variant.ou.rho < 1 else None
    posterior = variant.posterior or UPSTREAM_SCALE
    prior = variant.prior or UPSTREAM_SCALE
    decoder = variant.decoder or UPSTREAM_SCALE
    heads = (_head_map(posterior, fuse), _head_map(prior, fuse))  # fuse: each head's mapping compiled
    # the KL and the log density: one node each, keeping fewer tensors than vanilla; compiled with ``fuse``
    kl_math = blockmath.kl_math(wrap=fused if fuse else None)
    log_prob_math = blockmath.log_prob_math(wrap=fused if fuse else None)

    original_decoder_init = distributions.NormalDecoder.__dict__["__init__"]
    original_forward = model.AutoEncoder.__dict__["forward"]
    original_sample = model.AutoEncoder.__dict__["sample"]
    original_draw = distributions.Normal.__dict__["sample"]
    ou_parts = nvae_ou.Parts(distributions.soft_clamp5, getattr(model, "SyncBatchNormSwish", None),
                             getattr(sys.modules.get("neural_operations"), "SyncBatchNorm", None))

    def normal_init(self, mu, log_sigma, temp=1.):
        """N(soft_clamp5(mu), sigma) with sigma and an exact log sigma (replaces Normal.__init__)."""
        self.mu = distributions.soft_clamp5(mu)  # upstream's own clamp of the mean, kept
        pixel_scale = getattr(_state, "decoder", None)
        if pixel_scale is not None:  # inside NormalDecoder: raw pixel scale
            scale, log_scale = pixel_scale(log_sigma)
        elif getattr(_state, "depth", 0):  # inside AutoEncoder.forward / sample: already an exact log sigma
            scale, log_scale = torch.exp(log_sigma), log_sigma
        else:  # a Normal built by other code: its raw scale read as a posterior's
            scale, log_scale = posterior(log_sigma)
        if not (isinstance(temp, (int, float)) and temp == 1):
            scale, log_scale = _temper(scale, log_scale, temp)
        self.sigma, self.log_sigma = scale, log_scale
        ou_pass = nvae_ou.current() if smoothing is not None else None
        smoothed = ou_pass.smoothed_for(mu) if ou_pass is not None else None
        if smoothed is not None:  # the prior Normal of a smoothed head: U_rho mu, U_rho sigma
            self.mu, self.sigma, self.log_sigma = smoothed

    def draw(self):
        """Upstream's Normal.sample, the draw recorded for OU smoothing (patched only with ``ou``)."""
        z, eps = original_draw(self)
        ou_pass = nvae_ou.current()
        if ou_pass is not None:
            ou_pass.record_draw(z, self.mu, self.sigma)
        return z, eps

    def log_p(self, samples):
        """log N(samples; mu, sigma) from the exact log sigma (replaces Normal.log_p)."""
        return log_prob_math(samples, self.mu, self.log_sigma)

    def kl(self, normal_dist):
        """KL(self || normal_dist), the stable form on log sigmas (replaces Normal.kl)."""
        return kl_math(self.mu, self.log_sigma, normal_dist.mu, _log_sigma(normal_dist))

    def normal_decoder_init(self, *args, **kwargs):
        """Upstream's NormalDecoder.__init__, its Normal's scale from the variant's decoder scale."""
        outer = getattr(_state, "decoder", None)
        _state.decoder = decoder
        try:
            original_decoder_init(self, *args, **kwargs)
        finally:
            _state.decoder = outer

    def ou_smoothing(self):
        """OU smoothing for this forward: in training, with gradients, when the variant has ``ou``."""
        if smoothing is None or not (self.training and torch.is_grad_enabled()):
            return contextlib.nullcontext()
        return nvae_ou.smoothing(self, smoothing, prior, ou_parts)

    def forward(self, *args, **kwargs):
        """Upstream's AutoEncoder.forward with the heads mapped to exact log sigmas."""
        if variant.decoder is not None and (getattr(self, "num_mix_output", 1) != 1
                                            or getattr(self, "dataset", None) in ("mnist", "omniglot")):
            warnings.warn(f"variant {variant.name!r} sets a decoder scale ({variant.decoder}), but this model's "
                          "pixels are not a Normal (a discretized logistic mixture, or Bernoulli for binary "
                          "data; NormalDecoder needs --num_mixture_dec 1): the decoder scale is unused",
                          stacklevel=2)
        with _mapped_heads(self, *heads), ou_smoothing(self):
            return original_forward(self, *args, **kwargs)

    def sample(self, *args, **kwargs):
        """Upstream's AutoEncoder.sample with the prior heads mapped; temperature multiplies sigma."""
        with _mapped_heads(self, *heads):
            return original_sample(self, *args, **kwargs)

    fp = lambda owner, attr: FINGERPRINTS[(owner, attr)]  # noqa: E731
    Normal, NormalDecoder, AutoEncoder = distributions.Normal, distributions.NormalDecoder, model.AutoEncoder
    if getattr(model, "Normal", Normal) is not Normal:
        raise PatchError(f"model.Normal ({getattr(model, 'Normal')!r}) is not distributions.Normal: model.py was "
                         "imported against another distributions module; start a fresh interpreter")
    ou_patches = [Patch(Normal, "sample", draw, fp("distributions.Normal", "sample"))] if smoothing else []
    constant_side = any(side is not None and side.name == "constant" for side in (variant.posterior, variant.prior))
    operations = [sys.modules[name] for name in ("neural_operations", "neural_ar_operations") if name in sys.modules]
    norm_patches = [Patch(module, "normalize_weight_jit", safe_normalize_weight,
                          fp("neural_operations", "normalize_weight_jit") if module.__name__ == "neural_operations"
                          else None)
                    for module in operations] if constant_side else []
    return ou_patches + norm_patches + [
        Patch(Normal, "__init__", normal_init, fp("distributions.Normal", "__init__")),
        Patch(Normal, "log_p", log_p, fp("distributions.Normal", "log_p")),
        Patch(Normal, "kl", kl, fp("distributions.Normal", "kl")),
        Patch(NormalDecoder, "__init__", normal_decoder_init, fp("distributions.NormalDecoder", "__init__")),
        Patch(AutoEncoder, "forward", forward, fp("model.AutoEncoder", "forward")),
        Patch(AutoEncoder, "sample", sample, fp("model.AutoEncoder", "sample")),
    ]
