"""The torch.compile-fused block math (apply(..., fuse=True)) keeps the numerics of the eager form."""
import torch

from vaepatch import gaussian, scales
from vaepatch.compiled import fused


def _draw_and_kl(qm, qv, pm, pv, eps):
    # the same composition the VDVAE target fuses, for one fixed variant
    q_scale, q_log = scales.get("upbounded1")(qv)
    _, p_log = scales.get("explin")(pv)
    return gaussian.rsample(qm, q_scale, eps), gaussian.kl(qm, q_log, pm, p_log)


def test_fused_matches_eager_at_extreme_inputs():
    torch.manual_seed(0)
    raw = torch.tensor([-1e4, -200.0, -80.0, -1.0, 0.0, 1e-7, 1.0, 80.0, 1e4])
    qv, pv = torch.meshgrid(raw, raw, indexing="ij")
    qm, pm, eps = torch.randn_like(qv), torch.randn_like(qv), torch.randn_like(qv)
    fn = fused(_draw_and_kl)
    results = {}
    for name, f in (("eager", _draw_and_kl), ("fused", fn)):
        leaves = [t.clone().requires_grad_(True) for t in (qm, qv, pm, pv)]
        z, kl = f(*leaves, eps)
        finite = torch.isfinite(kl)
        (z.sum() + kl[finite].sum()).backward()
        results[name] = (z.detach(), kl.detach(), [leaf.grad for leaf in leaves])
    z_e, kl_e, g_e = results["eager"]
    z_f, kl_f, g_f = results["fused"]
    torch.testing.assert_close(z_f, z_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_f, kl_e, rtol=1e-5, atol=1e-5, equal_nan=False)
    _, kl_ref = _draw_and_kl(qm.double(), qv.double(), pm.double(), pv.double(), eps.double())
    representable = kl_ref.abs() < 1e30
    assert representable.sum() >= 50  # 54 of the 81 extreme pairs have a float32-sized KL
    assert torch.isfinite(kl_f[representable]).all()
    torch.testing.assert_close(kl_f[representable].double(), kl_ref[representable], rtol=1e-4, atol=1e-4)
    for a, b in zip(g_f, g_e):  # elementwise math: each element's gradient is its own
        torch.testing.assert_close(a[representable], b[representable], rtol=1e-4, atol=1e-5)
        assert torch.isfinite(a[representable]).all()


def _head_map_like(scale):
    # one closure per scale over one code object, as each side's head map and precision's wrapper are
    def head_map(raw):
        return scale(raw)[1] * 1.0

    return head_map


def test_fused_functions_sharing_code_each_keep_their_compiled_versions(caplog):
    """torch.compile counts recompiles per code object (limit 8) and past it runs eagerly: fused gives
    each function its own code, so nine closures of one function each compile, with no limit hit."""
    specs = ["exp", "explin", "upbounded1", "downbounded0.01", "bounded(1e-5, 1)", "cst1", "softplus1",
             "softplus2", "bounded(0.01, 1)"]
    x = torch.linspace(-30, 30, 24).reshape(2, 3, 2, 2)
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        for spec in specs:
            eager = _head_map_like(scales.get(spec))
            torch.testing.assert_close(fused(eager)(x), eager(x), rtol=1e-6, atol=1e-6)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()], caplog.text


def test_the_fused_node_matches_the_eager_node_at_extreme_inputs():
    """What fuse=True runs: the block math's node with its forward and backward compiled
    (``blockmath.block_math(..., wrap=fused)``), against the eager node, values and gradients."""
    from vaepatch import blockmath

    torch.manual_seed(0)
    raw = torch.tensor([-1e4, -200.0, -80.0, -1.0, 0.0, 1e-7, 1.0, 80.0, 1e4])
    qv, pv = torch.meshgrid(raw, raw, indexing="ij")
    qm, pm, eps = torch.randn_like(qv), torch.randn_like(qv), torch.randn_like(qv)
    post, prior = scales.get("upbounded1"), scales.get("explin")
    results = []
    for wrap in (None, fused):
        leaves = [t.clone().requires_grad_(True) for t in (qm, qv, pm, pv)]
        z, kl = blockmath.block_math(post, prior, wrap=wrap)(*leaves, eps)
        finite = torch.isfinite(kl)
        (z.sum() + kl[finite].sum()).backward()
        results.append((z.detach(), kl.detach(), [leaf.grad for leaf in leaves]))
    (z_e, kl_e, g_e), (z_f, kl_f, g_f) = results
    torch.testing.assert_close(z_f, z_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl_f, kl_e, rtol=1e-6, atol=1e-6)  # inf in the same places (a KL beyond float32)
    for a, b in zip(g_f, g_e):  # NaN in the same places too: a zero gradient times an infinite derivative
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.isfinite(a[torch.isfinite(kl_e)]).all()
