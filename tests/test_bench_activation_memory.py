"""`vaepatch bench activation-memory`: the count of bytes held for backward is exact (a toy graph with
known bytes), and the bench's rows on the real tiny VDVAE and NVAE say the patch holds no more than vanilla."""
import pytest
import torch

from vaepatch import upstream
from vaepatch.bench.cost import activation_memory as am
from vaepatch.bench.cost.measure import rss_rise, saved_bytes
from tests.nvae_support import require_nvae
from tests.vdvae_support import require_vdvae

pytestmark = pytest.mark.usefixtures("one_thread")
N = 1000  # float32 elements: 4000 bytes a tensor


def test_saved_bytes_counts_each_held_storage_once_without_parameters():
    weight = torch.randn(N, requires_grad=True)  # a parameter: its storage is never counted

    def loss():
        y = weight * 2.0  # a product by a number keeps nothing
        e = torch.exp(y)  # keeps its output e: 4000 bytes
        s = torch.sin(y)  # keeps y: 4000 bytes
        head = y[:10].cos()  # keeps a view of y: y's storage again, counted once
        torch.tanh(weight * 3.0)  # a result never used: its node is freed at once, with the output it kept
        return e.sum() + s.sum() + head.sum() + weight.sin().sum()  # sin(weight) keeps the parameter

    assert saved_bytes(loss, [weight]) == 2 * 4 * N
    assert saved_bytes(loss, []) == 3 * 4 * N  # the parameter counted once it is not excluded
    assert saved_bytes(lambda: (weight * 2.0).sum(), [weight]) == 0


def test_a_view_counts_its_whole_storage():
    """What a saved view holds alive is its whole storage (a chunk of a head's output holds the head output)."""
    x = torch.randn(4 * N, requires_grad=True)
    assert saved_bytes(lambda: (x * 1.0)[:N].exp().sum(), [x]) == 4 * N  # exp keeps its own output only
    assert saved_bytes(lambda: (x * 1.0)[:N].sin().sum(), [x]) == 4 * 4 * N  # sin keeps the view


def test_rss_rise_sees_what_a_step_allocates():
    if rss_rise(lambda: None) is None:
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    rise = rss_rise(lambda: torch.ones(16 * 2**20 // 4).sum())  # 16 MiB, touched
    assert 15 * 2**20 <= rise < 64 * 2**20


def test_the_bench_on_the_real_tiny_vdvae_eager_and_fused():
    """Vanilla and upbounded1 eager and fused, each in a fresh interpreter: the same count as in this one
    (exact: no allocator, no timing), the patch below vanilla, fused keeping exactly the eager node's
    tensors (the compiled autograd form kept more than vanilla), compiled without falling back."""
    require_vdvae()
    rows = am.measure([("vdvae", "tiny")], ["upbounded1"], modes=(False, True), rss=0)
    vanilla, eager, fused = rows
    assert (vanilla["variant"], eager["fuse"], fused["fuse"]) == ("vanilla", False, True)
    assert vanilla["saved"] == am.measure_one("vdvae", "vanilla", False, rss=0)["saved"]  # the same here
    assert vanilla["ratio"] == 1.0 and eager["saved"] < vanilla["saved"] and eager["ratio"] < 1.0
    assert fused["saved"] == eager["saved"]
    assert fused["graphs"] > 0 and not fused["fallbacks"] and eager["graphs"] == 0
    assert fused["loss"] == pytest.approx(eager["loss"], rel=1e-6) and eager["loss"] != vanilla["loss"]
    lines = am.table_lines(rows)
    assert lines[2].startswith("| vdvae | `vanilla` |") and f"{eager['saved']:,}" in lines[3]
    assert "yes (" in lines[3] and f"{eager['ratio']:.4f}" in lines[3]


def test_the_bench_on_the_real_tiny_nvae_with_and_without_its_flow(monkeypatch):
    """Eager upbounded1 on NVAE, log q - log p (one flow) and Normal.kl (none): below vanilla in both."""
    monkeypatch.setenv(upstream.pin("nvae").env, str(require_nvae()))  # the spawned interpreters find it
    rows = am.measure([("nvae", "tiny"), ("nvae", "no flow")], ["upbounded1"], modes=(False,), rss=0)
    assert [(r["model"], r["variant"]) for r in rows] == [("tiny", "vanilla"), ("tiny", "upbounded1"),
                                                        ("no flow", "vanilla"), ("no flow", "upbounded1")]
    assert rows[0]["saved"] != rows[2]["saved"]  # two models
    assert rows[1]["ratio"] < 1.0 and rows[3]["ratio"] < 1.0
    assert am.table_lines(rows)[4].startswith("| nvae, no flow | `vanilla` |")


def test_command_line_refuses_an_unknown_target():
    with pytest.raises(SystemExit) as exit_info:
        am.main(["--targets", "nosuch"])
    assert exit_info.value.code == 2


def test_command_line_refuses_an_unknown_variant_before_building_anything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        am.main(["--targets", "vdvae", "--variants", "upbounded1,nosuch"])
    assert exit_info.value.code == 2 and "nosuch" in capsys.readouterr().err
