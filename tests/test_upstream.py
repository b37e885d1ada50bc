"""vaepatch.upstream against throwaway local git repos (no network)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

git = pytest.importorskip("git")

from vaepatch import fetch_command, upstream  # noqa: E402
from vaepatch.upstream import Pin, UpstreamError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _commit(repo, files: dict[str, str], message: str) -> str:
    for rel, text in files.items():
        path = Path(repo.working_tree_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    repo.index.add(list(files))
    who = git.Actor("test", "test@example.com")
    return repo.index.commit(message, author=who, committer=who).hexsha


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """An upstream with two commits, pinned to the first (not the tip), as the only target."""
    src = git.Repo.init(tmp_path / "toy-src")
    c1 = _commit(src, {"toy_mod.py": "X = 1\n", "README": "toy\n"}, "one")
    c2 = _commit(src, {"toy_mod.py": "X = 2\n"}, "two")
    p = Pin(name="toy", url=str(tmp_path / "toy-src"), commit=c1, env="VAEPATCH_TOY",
            modules=("toy_mod",))
    monkeypatch.setattr(upstream, "PINS", {"toy": p})
    monkeypatch.setattr(upstream, "repo_root", lambda: None)
    monkeypatch.setenv("VAEPATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VAEPATCH_TOY", raising=False)
    src.close()
    return p, c1, c2, tmp_path


def _head(path) -> str:
    with git.Repo(path) as r:
        return r.head.commit.hexsha


def test_packaged_pins_match_third_party():
    packaged = (REPO / "vaepatch" / "upstream_pins.toml").read_bytes()
    repo_copy = (REPO / "third_party" / "UPSTREAM.toml").read_bytes()
    assert packaged == repo_copy, "edit both pin files together"


def test_real_pins():
    assert set(upstream.PINS) == {"vdvae", "nvae", "effvdvae", "hparams"}
    v = upstream.pin("vdvae")
    assert v.commit == "ea35b490313bc33e7f8ac63dd8132f3cc1a729b4"
    assert v.env == "VAEPATCH_VDVAE" and v.modules == ("vae_helpers", "vae")
    n = upstream.pin("nvae")
    assert n.commit == "9fc1a288fb831c87d93a4e2663bc30ccf9225b29"
    assert n.env == "VAEPATCH_NVAE" and n.modules == ("distributions", "model")
    e = upstream.pin("effvdvae")
    assert e.commit == "f779c40f24bbd69129bf477593baf4792f05147e" and e.needs == ("hparams",)
    assert e.tree == ("efficient_vdvae_torch", "65d617e6fa223a0ec3576a6a173b58e4b00da5bf")
    assert e.root == "efficient_vdvae_torch" and not e.library
    h = upstream.pin("hparams")
    assert h.commit == "549100f0fd0f77293e2b350536e7ec2eae32f507" and h.library and h.tree is None


def test_unknown_target_lists_names():
    with pytest.raises(ValueError, match="nvae, vdvae"):
        upstream.pin("vdvea")


def test_default_dest_in_source_checkout_is_third_party():
    assert upstream.repo_root() == REPO
    assert upstream.default_dest("vdvae") == REPO / "third_party" / "vdvae"


def test_default_dest_installed(toy, monkeypatch):
    _, _, _, tmp = toy
    assert upstream.default_dest("toy") == tmp / "home" / "toy"
    monkeypatch.delenv("VAEPATCH_HOME")
    monkeypatch.setenv("HOME", str(tmp / "user"))
    assert upstream.default_dest("toy") == tmp / "user" / ".cache" / "vaepatch" / "toy"


def test_fetch_from_local_path_checks_out_pinned_commit(toy, capsys):
    p, c1, c2, tmp = toy
    dest = upstream.fetch("toy", source=p.url)
    assert dest == (tmp / "home" / "toy").resolve()
    assert _head(dest) == c1
    with git.Repo(dest) as r:
        assert r.head.is_detached
    assert (dest / "toy_mod.py").read_text() == "X = 1\n"
    assert (dest / "README").exists()
    assert not list(dest.parent.glob(".toy.partial-*"))
    upstream.verify(dest, "toy")

    capsys.readouterr()
    assert upstream.fetch("toy", source=p.url) == dest  # no-op
    assert "already at pinned commit" in capsys.readouterr().out
    assert _head(dest) == c1


def test_fetch_from_bare_mirror_to_explicit_dest(toy):
    p, c1, _, tmp = toy
    mirror = tmp / "mirror.git"
    git.Repo.clone_from(p.url, mirror, mirror=True).close()
    dest = upstream.fetch("toy", source=str(mirror), dest=tmp / "elsewhere" / "clone")
    assert _head(dest) == c1


def test_wrong_commit_error_names_both_and_fix(toy):
    p, c1, c2, tmp = toy
    dest = upstream.fetch("toy", source=p.url)
    with git.Repo(dest) as r:
        r.git.checkout(c2)
    for call in (lambda: upstream.verify(dest, "toy"), lambda: upstream.fetch("toy")):
        with pytest.raises(UpstreamError) as e:
            call()
        msg = str(e.value)
        assert c1 in msg and c2 in msg
        assert "run: vaepatch fetch toy --force" in msg
        assert f"checkout {c1}" in msg
    assert _head(dest) == c2  # nothing changed without --force

    upstream.fetch("toy", force=True)
    assert _head(dest) == c1
    upstream.verify(dest, "toy")


def test_force_fetches_missing_commit_into_existing_clone(toy):
    p, c1, c2, tmp = toy
    other = git.Repo.init(tmp / "other")
    _commit(other, {"x.py": "pass\n"}, "unrelated")
    other.close()
    with pytest.raises(UpstreamError, match="--force"):
        upstream.fetch("toy", source=p.url, dest=tmp / "other")
    upstream.fetch("toy", source=p.url, dest=tmp / "other", force=True)
    assert _head(tmp / "other") == c1


def test_dirty_tree_lists_files_and_force_discards(toy, capsys):
    p, c1, _, _ = toy
    dest = upstream.fetch("toy", source=p.url)
    (dest / "toy_mod.py").write_text("X = 'edited'\n")
    with pytest.raises(UpstreamError) as e:
        upstream.verify(dest, "toy")
    msg = str(e.value)
    assert "toy_mod.py" in msg
    assert "never edits" in msg
    assert f"git -C {dest} stash" in msg
    assert "vaepatch fetch toy --force" in msg

    with pytest.warns(UserWarning, match="toy_mod.py"):
        upstream.verify(dest, "toy", allow_dirty=True)
    with pytest.raises(UpstreamError, match="toy_mod.py"):
        upstream.fetch("toy", source=p.url)  # dirty needs --force

    capsys.readouterr()
    upstream.fetch("toy", source=p.url, force=True)
    assert "discarding" in capsys.readouterr().out
    assert (dest / "toy_mod.py").read_text() == "X = 1\n"


def test_untracked_pycache_is_not_dirty(toy):
    p, _, _, _ = toy
    dest = upstream.fetch("toy", source=p.url)
    (dest / "__pycache__").mkdir()
    (dest / "__pycache__" / "toy_mod.cpython-311.pyc").write_bytes(b"\0")
    (dest / "new_output.txt").write_text("x")
    upstream.verify(dest, "toy")
    s = upstream.status("toy")
    assert s.ok and s.dirty is False


def test_source_without_commit_is_clear_error(toy):
    p, c1, _, tmp = toy
    other = git.Repo.init(tmp / "other-src")
    _commit(other, {"x.py": "pass\n"}, "unrelated")
    other.close()
    with pytest.raises(UpstreamError) as e:
        upstream.fetch("toy", source=str(tmp / "other-src"))
    msg = str(e.value)
    assert c1 in msg
    assert f"run: vaepatch fetch toy --source {p.url}" in msg
    assert not (tmp / "home" / "toy").exists()  # no half clone left behind
    assert not list((tmp / "home").glob(".toy.partial-*"))


def test_not_a_git_checkout(toy):
    _, _, _, tmp = toy
    plain = tmp / "plain"
    plain.mkdir()
    (plain / "toy_mod.py").write_text("X = 1\n")
    fix = re.escape(f"run: vaepatch fetch toy --dest {plain}")
    with pytest.raises(UpstreamError, match=fix):
        upstream.verify(plain, "toy")
    with pytest.raises(UpstreamError, match="not a git checkout"):
        upstream.fetch("toy", dest=plain, force=True)  # never deletes a directory
    assert (plain / "toy_mod.py").exists()
    fix = re.escape(f"run: vaepatch fetch toy --dest {tmp / 'nope'}")
    with pytest.raises(UpstreamError, match=fix):
        upstream.verify(tmp / "nope", "toy")


def test_locate_order_and_explicit_missing(toy, monkeypatch):
    p, _, _, tmp = toy
    assert upstream.locate("toy") is None  # nothing fetched, no explicit path
    default = upstream.fetch("toy", source=p.url)
    assert upstream.locate("toy") == default

    env_dir = tmp / "env-clone"
    env_dir.mkdir()
    monkeypatch.setenv("VAEPATCH_TOY", str(env_dir))
    assert upstream.locate("toy") == env_dir.resolve()  # env beats default

    arg_dir = tmp / "arg-clone"
    arg_dir.mkdir()
    assert upstream.locate("toy", upstream=arg_dir) == arg_dir.resolve()  # arg beats env

    with pytest.raises(UpstreamError) as e:
        upstream.locate("toy", upstream=tmp / "missing-arg")
    assert f"run: vaepatch fetch toy --dest {tmp / 'missing-arg'}" in str(e.value)

    monkeypatch.setenv("VAEPATCH_TOY", str(tmp / "missing-env"))
    with pytest.raises(UpstreamError) as e:
        upstream.locate("toy")  # must not fall through to the default clone
    assert "$VAEPATCH_TOY" in str(e.value)
    assert f"run: vaepatch fetch toy --dest {tmp / 'missing-env'}" in str(e.value)


def test_fetch_default_dest_follows_env(toy, monkeypatch):
    p, c1, _, tmp = toy
    monkeypatch.setenv("VAEPATCH_TOY", str(tmp / "via-env"))
    dest = upstream.fetch("toy", source=p.url)
    assert dest == (tmp / "via-env").resolve()
    assert upstream.locate("toy") == dest


def test_add_to_path_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    upstream.add_to_path(tmp_path)
    upstream.add_to_path(tmp_path)
    assert sys.path[0] == str(tmp_path.resolve())
    assert sys.path.count(str(tmp_path.resolve())) == 1


def test_cli_check_missing_then_ok_then_dirty(toy, capsys):
    p, c1, _, tmp = toy
    assert fetch_command.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["target", "path", "commit", "status"]
    assert "missing" in out and "run: vaepatch fetch toy" in out

    assert fetch_command.main(["toy", "--source", p.url]) == 0
    capsys.readouterr()
    assert fetch_command.main(["--check"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row == ["toy", str(tmp / "home" / "toy"), c1[:12], "ok"]

    (tmp / "home" / "toy" / "README").write_text("changed\n")
    assert fetch_command.main(["toy", "--check"]) == 1
    out = capsys.readouterr().out
    assert "dirty" in out and "README" in out


def test_cli_errors_exit_2_without_traceback(toy, capsys):
    _, c1, _, tmp = toy
    assert fetch_command.main(["toy", "--source", str(tmp / "no-such-source")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "run: vaepatch fetch toy --source" in err

    assert fetch_command.main(["nosuch"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert fetch_command.main(["--check", "--force"]) == 2
    assert fetch_command.main(["--source", str(tmp / "x")]) == 2  # for every target: a folder holding them
    assert "missing: toy" in capsys.readouterr().err
    assert fetch_command.main(["--help"]) == 0
    assert "vaepatch fetch" in capsys.readouterr().out


def test_cli_all_with_dest_uses_subdirectories(toy, capsys):
    p, c1, _, tmp = toy
    upstream.fetch("toy", source=p.url, dest=tmp / "base" / "toy")
    assert fetch_command.main(["all", "--dest", str(tmp / "base")]) == 0
    assert "already at pinned commit" in capsys.readouterr().out
    assert fetch_command.main(["--check", "--dest", str(tmp / "base")]) == 0
    statuses = upstream.check(tmp / "base")
    assert [s.ok for s in statuses] == [True]


def test_cli_all_from_a_folder_of_bundles(toy, capsys):
    """CI's offline path: ``vaepatch fetch --source DIR`` with DIR holding <name>.bundle per target."""
    import subprocess

    p, c1, _, tmp = toy
    bundles = tmp / "bundles"
    bundles.mkdir()
    subprocess.run(["git", "-C", p.url, "bundle", "create", str(bundles / "toy.bundle"), "--all"], check=True,
                   capture_output=True)
    assert fetch_command.main(["--source", str(bundles), "--dest", str(tmp / "clones")]) == 0
    assert _head(tmp / "clones" / "toy") == c1  # the pinned commit, not the bundle's tip
