"""The stability-margin and skip-counts (Table 4) benches take --target effvdvae: the commands they would start
(no run here: tests/test_effvdvae_launch.py runs the real code)."""
from __future__ import annotations

from pathlib import Path

import pytest

from vaepatch.bench import margin as stability_margin, skip_counts
from vaepatch.targets.effvdvae import tiny


def test_a_margin_run_is_vaepatch_run_effvdvae_with_its_config_overrides(tmp_path):
    command = stability_margin._command("effvdvae", tiny, tmp_path / "run", tmp_path / "data", "off", "qfloor-cst1",
                                        0.01, 2, 1000, 100, ["optimizer.warmup_steps=10."], None)
    assert command[3:6] == ["run", "effvdvae", "--variant"] and "--cpu" in command
    assert command[command.index("--data") + 1] == str(tmp_path / "data")
    train = command[command.index("--") + 1:]
    assert train[:len(tiny.TRAIN_ARGS)] == tiny.TRAIN_ARGS
    assert train[-3:] == ["run.seed=2", "optimizer.gradient_skip=False", "optimizer.warmup_steps=10."]
    assert "optimizer.learning_rate=0.01" in train
    assert stability_margin.DEFAULTS["effvdvae"]["skip"] == "both" and set(tiny.SKIP_POLICIES) == {"upstream", "off"}


def test_skip_counts_takes_the_target_its_rate_and_its_rules():
    args = skip_counts._parse(["--target", "effvdvae"])
    assert (args.target, args.lr) == ("effvdvae", 0.001)
    assert skip_counts._parse([]).lr == 0.01  # VDVAE's, as before
    assert tiny.threshold_args(0.18) == ["optimizer.gradient_skip=True", "optimizer.gradient_skip_threshold=0.18"]


def test_make_data_has_a_validation_set_and_an_epoch_longer_than_the_run(tmp_path):
    from vaepatch import cifar_format

    train, _ = cifar_format.read(tiny.make_data(tmp_path, steps=3), True)
    test, _ = cifar_format.read(Path(tmp_path), False)
    assert len(train) == tiny.BATCH * 4 and len(test) == 2 * tiny.N_VAL


@pytest.mark.parametrize("bench", ["stability-margin", "skip-counts"])
def test_a_bench_without_its_clone_says_what_to_fetch(bench, tmp_path, monkeypatch, capsys):
    """No clone where the pin looks (and none given): exit 2 naming the fetch command, before any run starts;
    a --upstream that does not exist is named as such."""
    from vaepatch import cli, upstream

    monkeypatch.delenv(upstream.pin("effvdvae").env, raising=False)
    monkeypatch.setattr(upstream, "default_dest", lambda name: tmp_path / "absent" / name)
    assert cli.main(["bench", bench, "--target", "effvdvae", "--out", str(tmp_path / "out")]) == 2
    assert "no effvdvae clone found" in capsys.readouterr().err and not (tmp_path / "out" / "runs").exists()
    assert cli.main(["bench", bench, "--target", "effvdvae", "--upstream", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
