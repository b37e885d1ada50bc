"""A pin that names a folder's tree as well as a commit (Efficient-VDVAE's: the offline bundle repackages
upstream's commit, so its id differs, but ``efficient_vdvae_torch/`` is the same tree), and a pin's libraries."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

git = pytest.importorskip("git")

from vaepatch import fetch_command, upstream  # noqa: E402
from vaepatch.upstream import Pin, UpstreamError  # noqa: E402
from tests.test_upstream import _commit, _head  # noqa: E402


def _tree(repo_path, commit, folder) -> str:
    return subprocess.run(["git", "-C", str(repo_path), "rev-parse", f"{commit}:{folder}"], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repackaged(tmp_path, monkeypatch):
    """'GitHub' has commit c1 with pkg/ and a big file; the 'bundle' repackages it without the big file (another
    commit id, the same pkg/ tree), then a later commit c2 that changes pkg/. The pin names c1 and pkg/'s tree;
    a library pin 'lib' sits beside it."""
    github = git.Repo.init(tmp_path / "github")
    c1 = _commit(github, {"pkg/mod.py": "X = 1\n", "images/big.png": "png\n"}, "upstream")
    bundle = git.Repo.init(tmp_path / "bundle-src")
    repackaged = _commit(bundle, {"pkg/mod.py": "X = 1\n"}, "upstream without images/big.png")
    c2 = _commit(bundle, {"pkg/mod.py": "X = 2\n"}, "later")
    tree = _tree(tmp_path / "github", c1, "pkg")
    assert _tree(tmp_path / "bundle-src", repackaged, "pkg") == tree != _tree(tmp_path / "bundle-src", c2, "pkg")
    lib = git.Repo.init(tmp_path / "lib-src")
    lib_commit = _commit(lib, {"lib.py": "Y = 1\n"}, "lib")
    for repo in (github, bundle, lib):
        repo.close()
    sources = tmp_path / "sources"
    sources.mkdir()
    for name, src in (("toy", "bundle-src"), ("lib", "lib-src")):
        subprocess.run(["git", "-C", str(tmp_path / src), "bundle", "create", str(sources / f"{name}.bundle"),
                        "--all"], check=True, capture_output=True)
    pins = {"toy": Pin(name="toy", url=str(tmp_path / "github"), commit=c1, env="VAEPATCH_TOY", modules=("mod",),
                       tree=("pkg", tree), root="pkg", needs=("lib",)),
            "lib": Pin(name="lib", url=str(tmp_path / "lib-src"), commit=lib_commit, env="VAEPATCH_LIB",
                       modules=("lib",), library=True)}
    monkeypatch.setattr(upstream, "PINS", pins)
    monkeypatch.setattr(upstream, "repo_root", lambda: None)
    monkeypatch.setenv("VAEPATCH_HOME", str(tmp_path / "home"))
    for env in ("VAEPATCH_TOY", "VAEPATCH_LIB"):
        monkeypatch.delenv(env, raising=False)
    return dict(c1=c1, c2=c2, repackaged=repackaged, tree=tree, sources=sources, tmp=tmp_path, lib=lib_commit)


def test_the_real_commit_is_taken_where_the_source_has_it(repackaged):
    dest = upstream.fetch("toy")  # from 'GitHub', the pin's url
    assert _head(dest) == repackaged["c1"]
    upstream.verify(dest, "toy")


def test_a_repackaged_commit_with_the_pinned_tree_is_accepted(repackaged, capsys):
    dest = upstream.fetch("toy", source=repackaged["sources"] / "toy.bundle")
    assert _head(dest) == repackaged["repackaged"]  # not the bundle's tip c2
    assert "whose pkg/ is the pinned tree" in capsys.readouterr().out
    assert upstream.verify(dest, "toy") == dest
    assert upstream.status("toy").state == "ok"
    assert upstream.fetch("toy", source=repackaged["sources"] / "toy.bundle") == dest  # already there: a no-op


def test_another_tree_is_refused_naming_both_trees(repackaged):
    dest = upstream.fetch("toy", source=repackaged["sources"] / "toy.bundle")
    with git.Repo(dest) as r:
        r.git.checkout(repackaged["c2"])
    with pytest.raises(UpstreamError) as e:
        upstream.verify(dest, "toy")
    message = str(e.value)
    assert repackaged["c1"] in message and repackaged["tree"] in message and "pkg/" in message
    assert _tree(dest, "HEAD", "pkg") in message  # what it found
    assert upstream.status("toy").state == "wrong commit"
    upstream.fetch("toy", force=True, source=repackaged["sources"] / "toy.bundle")
    assert _head(dest) == repackaged["repackaged"]


def test_a_source_without_the_commit_or_the_tree_says_so(repackaged):
    with pytest.raises(UpstreamError, match=f"nor any commit whose pkg/ is the pinned tree {repackaged['tree']}"):
        upstream.fetch("toy", source=repackaged["sources"] / "lib.bundle")


def test_fetch_by_name_brings_the_libraries_from_beside_the_bundle(repackaged):
    """`vaepatch fetch NAME --source DIR/NAME.bundle` (or the folder DIR): NAME and each library it needs."""
    assert fetch_command.main(["toy", "--source", str(repackaged["sources"] / "toy.bundle")]) == 0
    home = repackaged["tmp"] / "home"
    assert _head(home / "toy") == repackaged["repackaged"] and _head(home / "lib") == repackaged["lib"]
    assert fetch_command.main(["toy", "--source", str(repackaged["sources"])]) == 0  # the folder: already there
    assert fetch_command.main(["toy", "--check"]) == 0


def test_activate_puts_the_root_and_the_libraries_on_the_path(repackaged, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    toy = upstream.fetch("toy", source=repackaged["sources"] / "toy.bundle")
    with pytest.raises(UpstreamError, match="run: vaepatch fetch lib"):
        upstream.activate("toy", toy)
    lib = upstream.fetch("lib", source=repackaged["sources"] / "lib.bundle")
    upstream.activate("toy", toy)
    assert sys.path[:2] == [str(toy / "pkg"), str(lib)]


def test_the_real_pin_accepts_the_bundle_and_upstreams_commit_by_tree(tmp_path):
    """Efficient-VDVAE's pin: upstream's f779c40 and the bundle's repackaged 4685c83 hold the same tree."""
    from vaepatch import git_clone

    p = upstream.pin("effvdvae")
    bundle = Path(__file__).resolve().parents[1].parent / "shared" / "upstream" / "effvdvae.bundle"
    if not bundle.is_file():
        pytest.skip(f"SKIPPED, needs {bundle}")
    heads = subprocess.run(["git", "bundle", "list-heads", str(bundle)], check=True, capture_output=True,
                           text=True).stdout.split()
    assert "4685c8377bf97eb4b9bc8c0899fa5a5c132f768a" in heads and p.commit not in heads
    assert p.tree == ("efficient_vdvae_torch", "65d617e6fa223a0ec3576a6a173b58e4b00da5bf")
    with git.Repo.clone_from(str(bundle), tmp_path / "clone", bare=True) as repo:
        assert git_clone.commit_with_tree(repo, *p.tree) == "4685c8377bf97eb4b9bc8c0899fa5a5c132f768a"
