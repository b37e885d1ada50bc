"""Where a training step broke: per latent group, the KL and the range of each side's raw scale and sigma.

A target attaches :class:`GroupWatch` to its model with forward hooks that only *read* (the
computation, and so a vanilla run, stays bit-identical). Each step, every group's KL sum and
finiteness and each head's raw-scale min/max are reduced on the device; :meth:`GroupWatch.where`
reads them back in one host sync, only for a step that went non-finite or was skipped, and names
the first group whose KL went non-finite (else the one with the largest KL), its two sides' raw and
sigma ranges, and the likely cause ("prior sigma underflow", "posterior sigma overflow", ...).

The cause is judged against the float32 range the KL's terms need: upstream KLs square sigma
(VDVAE: ``exp(logsigma) ** 2``), so sigma^2 leaves float32 when log sigma < log(tiny)/2 = -43.7 or
> log(max)/2 = 44.4, and the stable KL's ``exp(2 (log sigma_q - log sigma_p))`` overflows when the
log-ratio passes 44.4.
"""
from __future__ import annotations

import math

import torch

__all__ = ["GroupWatch", "LOG_SIGMA_UNDERFLOW", "LOG_SIGMA_OVERFLOW", "describe", "origin", "gradient_top"]

_F32 = torch.finfo(torch.float32)
LOG_SIGMA_UNDERFLOW = math.log(_F32.tiny) / 2  # -43.7: sigma^2 below float32's smallest normal
LOG_SIGMA_OVERFLOW = math.log(_F32.max) / 2  # 44.4: sigma^2 above float32's largest value
SIDES = ("posterior", "prior")


class GroupWatch:
    """One step's per-group statistics, kept as device tensors until :meth:`where` reads them.

    ``labels[i]`` names group i ("block 3 (16x16)"); ``scales`` maps each side to the
    ``vaepatch.scales.Scale`` that turns its raw output into sigma (monotone, so the raw range's
    ends give sigma's range); a side missing for a group (NVAE's fixed top prior) stays empty.
    """

    def __init__(self, labels, scales: dict):
        self.labels = list(labels)
        self.scales = scales
        self.reset()

    def reset(self) -> None:
        self._raw = {}  # (group, side) -> (min, max) 0-d tensors
        self._kl = {}  # group -> (sum, all finite) 0-d tensors

    def raw(self, group: int, side: str, raw: torch.Tensor) -> None:
        """Record a head's raw scale output (several calls in one step widen the range)."""
        raw = raw.detach()
        low, high = raw.amin(), raw.amax()
        if (group, side) in self._raw:
            old_low, old_high = self._raw[(group, side)]
            low, high = torch.minimum(old_low, low), torch.maximum(old_high, high)
        self._raw[(group, side)] = (low, high)

    def kl(self, group: int, kl: torch.Tensor) -> None:
        kl = kl.detach()
        self._kl[group] = (kl.float().sum(), torch.isfinite(kl).all())

    def ranges(self):
        """Each side's raw-scale range over all groups, as 4 device values (posterior min, max, prior
        min, max; NaN where a side was not seen), for the caller to read back with its own numbers."""
        out = []
        for side in SIDES:
            lows = [low for (g, s), (low, high) in self._raw.items() if s == side]
            highs = [high for (g, s), (low, high) in self._raw.items() if s == side]
            if lows:
                out += [torch.stack(lows).min(), torch.stack(highs).max()]
            else:
                out += [torch.tensor(math.nan), torch.tensor(math.nan)]
        return out

    def log_sigma_ranges(self, values) -> dict:
        """``{"posterior": {"raw": [lo, hi], "log_sigma": [lo, hi]}, "prior": ...}`` from the four values
        :meth:`ranges` gave, read back: the scale range the step used, for every event."""
        out = {}
        for i, side in enumerate(SIDES):
            low, high = values[2 * i], values[2 * i + 1]
            if not (math.isnan(low) and math.isnan(high)):
                out[side] = self._side(side, low, high)
        return out

    def where(self) -> dict | None:
        """The provenance record of this step (one host sync), or None if nothing was recorded."""
        if not self._kl:
            return None
        groups = sorted(self._kl)
        keys = sorted(self._raw)
        values = [v for g in groups for v in self._kl[g]] + [v for k in keys for v in self._raw[k]]
        flat = torch.stack([v.float().reshape(()).to(values[0].device) for v in values]).tolist()
        kl = {g: (flat[2 * i], bool(flat[2 * i + 1])) for i, g in enumerate(groups)}
        offset = 2 * len(groups)
        raw = {k: (flat[offset + 2 * i], flat[offset + 2 * i + 1]) for i, k in enumerate(keys)}
        broken = [g for g in groups if not kl[g][1]]
        if broken:
            group = broken[0]
        else:
            group = max(groups, key=lambda g: kl[g][0] if math.isfinite(kl[g][0]) else math.inf)
        record = {"group": group, "label": self.labels[group] if group < len(self.labels) else f"group {group}",
                  "kl": kl[group][0] if math.isfinite(kl[group][0]) else None, "kl_finite": kl[group][1],
                  "groups_nonfinite": len(broken)}
        for side in SIDES:
            if (group, side) in raw:
                record[side] = self._side(side, *raw[(group, side)])
        record["cause"] = _cause(record)
        return record

    def _side(self, side, low, high) -> dict:
        out = {"raw": [_num(low), _num(high)]}
        scale = self.scales.get(side)
        if scale is not None and math.isfinite(low) and math.isfinite(high):
            _, log_sigma = scale(torch.tensor([low, high], dtype=torch.float64))
            out["log_sigma"] = [_num(v) for v in log_sigma.tolist()]
        return out


def _num(x: float):
    return x if math.isfinite(x) else None


def _cause(record: dict) -> str:
    """The likeliest reason, from the log-sigma ranges (see the module docstring)."""
    found = []
    for side in SIDES:
        info = record.get(side)
        if info is None:
            continue
        if None in info["raw"]:
            found.append(f"{side} raw scale non-finite")
            continue
        low, high = info.get("log_sigma", [None, None])
        if low is not None and low < LOG_SIGMA_UNDERFLOW:
            found.append(f"{side} sigma underflow")
        if high is not None and high > LOG_SIGMA_OVERFLOW:
            found.append(f"{side} sigma overflow")
    post, prior = record.get("posterior", {}).get("log_sigma"), record.get("prior", {}).get("log_sigma")
    if not found and post and prior and None not in post + prior and post[1] - prior[0] > LOG_SIGMA_OVERFLOW:
        found.append("posterior sigma / prior sigma overflow")
    if found:
        return ", ".join(found)
    return "KL non-finite with sigma in range" if not record["kl_finite"] else "largest KL, sigma in range"


def origin(record: dict) -> str:
    """A short key for counting where steps broke: "block 17 (16x16): prior sigma underflow"."""
    return f"{record.get('label', '?')}: {record.get('cause', '?')}"


def describe(event: dict) -> str:
    """One line for a failing step's event: the part, the group, the side, the ranges."""
    parts = event.get("nonfinite") or ([] if event.get("finite", True) else ["loss"])
    head = f"step {event['step']}: " + (f"{' and '.join(parts)} non-finite" if parts else
                                         f"update skipped ({event.get('reason')})")
    where = event.get("where")
    if not where:
        return head
    ranges = []
    for side in SIDES:
        info = where.get(side)
        if info:
            raw = "..".join("nan" if v is None else f"{v:.3g}" for v in info["raw"])
            ranges.append(f"{side} raw {raw}")
    line = f"{head} at {origin(where)}" + (f" ({', '.join(ranges)})" if ranges else "")
    top = where.get("grad_top") or []
    if top and top[0][2] is not None:
        line += f"; gradient mostly {top[0][0]} ({top[0][2]:.0%} of its squared norm)"
    elif top:
        line += f"; gradient non-finite in {top[0][0]}"
    return line


def gradient_top(named_parameters, k: int = 3, depth: int = 4) -> list:
    """What drove a step's gradient norm: the ``k`` modules (parameter names cut to ``depth`` parts,
    e.g. ``decoder.dec_blocks.8.prior``) with the largest gradient norm, as ``[name, norm, share of
    the squared total]``; one host sync. Non-finite norms sort first."""
    squares = {}
    for name, p in named_parameters:
        if p.grad is not None:
            key = ".".join(name.split(".")[:depth])
            sq = p.grad.detach().float().pow(2).sum()
            squares[key] = squares[key] + sq if key in squares else sq
    if not squares:
        return []
    names = list(squares)
    values = torch.stack([squares[n] for n in names]).tolist()
    total = sum(v for v in values if math.isfinite(v))
    ranked = sorted(zip(names, values), key=lambda nv: (math.isfinite(nv[1]), -nv[1] if math.isfinite(nv[1]) else 0))
    return [[n, _num(math.sqrt(v)) if math.isfinite(v) else None,
             _num(v / total) if total and math.isfinite(v) else None]
            for n, v in ranked[:k]]
