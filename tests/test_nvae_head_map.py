"""NVAE's head map (a head's (mean, raw scale) output -> (mean, exact log sigma)) keeps the head's
memory layout, eager and fused. NVAE runs channels_last; some forms' ops return contiguous tensors,
and the convolutions after a head round differently per layout, so a changed layout moves a loss
(by ~4e-5 of itself on nvae-step-time's model) although every mapped value is the same."""
import pytest
import torch

from vaepatch import scales
from vaepatch.targets.nvae.patch import _head_map

SPECS = ["naive_exp", "exp", "explin", "upbounded1", "downbounded0.01", "bounded(1e-5, 1)", "cst1", "softplus1"]


def _head_output():
    torch.manual_seed(0)
    # 8 channels (4 means, 4 raw scales) over 3x5 pixels: shapes that do not coincide
    return (torch.randn(2, 8, 3, 5) * 10).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("spec", SPECS)
def test_eager_head_map_keeps_channels_last_and_maps_the_scale_half(spec):
    output = _head_output()
    mapped = _head_map(scales.get(spec), fuse=False)(output)
    assert mapped.stride() == output.stride()
    torch.testing.assert_close(mapped[:, :4], output[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(mapped[:, 4:], scales.get(spec)(output[:, 4:].contiguous())[1], rtol=1e-6, atol=1e-6)
    plain = output.contiguous()
    assert _head_map(scales.get(spec), fuse=False)(plain).stride() == plain.stride()


@pytest.mark.parametrize("spec", ["bounded(1e-5, 1)", "upbounded1"])
def test_fused_head_map_keeps_the_layout_and_the_eager_values(spec):
    output = _head_output()
    eager = _head_map(scales.get(spec), fuse=False)(output)
    fused = _head_map(scales.get(spec), fuse=True)(output)
    assert fused.stride() == output.stride()
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)
