"""CI runs every test that needs a real upstream: none of them may skip there for want of a clone."""
import importlib.util
import shutil

import pytest

from tests import vdvae_support
from vaepatch import upstream


def test_in_ci_a_missing_clone_is_an_error_not_a_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(vdvae_support, "SHARED_UPSTREAM", tmp_path)  # the bundles "are there"
    monkeypatch.setenv("VAEPATCH_VDVAE", str(tmp_path / "absent"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(vdvae_support.MissingCloneInCI, match="must run, not skip"):
        vdvae_support.usable_clone("vdvae", "openai/vdvae")
    monkeypatch.setenv("CI", "")
    path, reason = vdvae_support.usable_clone("vdvae", "openai/vdvae")
    assert path is None and "not a directory" in reason  # off CI: a skip with its reason, as before


@pytest.mark.skipif(vdvae_support.clones_required() is None,
                    reason="only in CI ($CI set) with ../shared/upstream beside the checkout")
def test_ci_has_everything_the_upstream_tests_need():
    for name in upstream.PINS:
        path = upstream.locate(name)
        assert path is not None, f"no {name} clone in CI"
        upstream.verify(path, name)
    assert importlib.util.find_spec("mpi4py") is not None, "CI installs .[mpi]: VDVAE's launcher needs mpi4py"
    assert shutil.which("mpiexec"), "CI installs .[mpi]: the two-process launcher tests need mpiexec"
