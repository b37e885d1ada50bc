"""Tests for the generic patch engine against a small synthetic upstream written at test time."""
import importlib
import inspect
import sys
import uuid
import warnings

import pytest
import torch

from vaepatch.patching import (
    FingerprintMismatch, FingerprintWarning, Patch, PatchError, PatchSet, fingerprint,
)

HELPERS = '''
import torch


def plain(x):
    """A plain module function."""
    return x + 1


@torch.jit.script
def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -0.5 + (a - b) ** 2
'''

MODEL = '''
import torch
from {pkg}.helpers import kl


def forward(x):
    return x * 100


class Base:
    def describe(self):
        return "base"


class Net(Base):
    def forward(self, x):
        return kl(x, x + 1)

    @staticmethod
    def scale(x):
        return 2 * x
'''


@pytest.fixture
def upstream(tmp_path):
    """Write and import a fresh package with a unique name; clean sys.modules/sys.path after."""
    pkg = f"fake_upstream_{uuid.uuid4().hex[:12]}"
    root = tmp_path / pkg
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "helpers.py").write_text(HELPERS)
    (root / "model.py").write_text(MODEL.format(pkg=pkg))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch
            warnings.simplefilter("ignore", DeprecationWarning)
            helpers = importlib.import_module(f"{pkg}.helpers")
        model = importlib.import_module(f"{pkg}.model")
        yield helpers, model, root
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


def _new_kl(a, b):
    return torch.full_like(a, 42.0)


def _new_forward(self, x):
    return x * 0 - 7


def test_patch_and_revert_restore_identity(upstream):
    helpers, model, _ = upstream
    Net, Base = model.Net, model.Base
    orig_kl, orig_model_kl = helpers.kl, model.kl
    assert orig_model_kl is orig_kl  # imported by value
    orig_forward, orig_scale = vars(Net)["forward"], vars(Net)["scale"]
    assert isinstance(orig_scale, staticmethod)
    assert "describe" not in vars(Net)

    ps = PatchSet([
        Patch(helpers, "kl", _new_kl),
        Patch(model, "kl", _new_kl),
        Patch(Net, "forward", _new_forward),
        Patch(Net, "describe", lambda self: "patched"),
        Patch(Net, "scale", staticmethod(lambda x: 3 * x)),
    ], label="test")
    assert not ps.applied
    x = torch.zeros(3)
    assert torch.equal(Net().forward(x), torch.full((3,), 0.5))
    ps.apply()
    assert ps.applied
    assert model.kl is _new_kl and helpers.kl is _new_kl
    assert torch.equal(Net().forward(x), torch.full((3,), -7.0))
    assert Net().describe() == "patched" and Base().describe() == "base"
    assert Net.scale(5) == 15

    ps.revert()
    assert not ps.applied
    assert helpers.kl is orig_kl and model.kl is orig_kl
    assert vars(Net)["forward"] is orig_forward
    assert vars(Net)["scale"] is orig_scale and Net.scale(5) == 10
    assert "describe" not in vars(Net) and Net.describe is vars(Base)["describe"]
    assert Net().describe() == "base"
    assert torch.equal(Net().forward(x), torch.full((3,), 0.5))


def test_patch_by_value_import_is_independent(upstream):
    """Patching the defining module alone does not reach a by-value import; each is its own Patch."""
    helpers, model, _ = upstream
    orig = helpers.kl
    with PatchSet([Patch(helpers, "kl", _new_kl)]):
        assert helpers.kl is _new_kl
        assert model.kl is orig
    assert helpers.kl is orig


def test_missing_attribute_is_created_then_deleted(upstream):
    helpers, _, _ = upstream
    ps = PatchSet([Patch(helpers, "brand_new", 123)]).apply()
    assert helpers.brand_new == 123
    ps.revert()
    assert not hasattr(helpers, "brand_new")


def test_apply_and_revert_are_idempotent(upstream):
    helpers, model, _ = upstream
    orig = vars(model.Net)["forward"]
    ps = PatchSet([Patch(model.Net, "forward", _new_forward)])
    assert ps.apply() is ps
    ps.apply()  # must not record the replacement as the "original"
    assert vars(model.Net)["forward"] is _new_forward
    ps.revert()
    assert vars(model.Net)["forward"] is orig
    # Someone else changes it afterwards: a second revert must not touch it.
    other = lambda self, x: x  # noqa: E731
    model.Net.forward = other
    ps.revert()
    assert vars(model.Net)["forward"] is other
    # And the set can be applied again after a revert.
    model.Net.forward = orig
    ps.apply()
    assert vars(model.Net)["forward"] is _new_forward
    ps.revert()
    assert vars(model.Net)["forward"] is orig


def test_apply_is_atomic(upstream):
    helpers, model, _ = upstream
    orig_kl, orig_forward = helpers.kl, vars(model.Net)["forward"]
    ps = PatchSet([
        Patch(helpers, "kl", _new_kl),
        Patch(model.Net, "forward", _new_forward),
        Patch(int, "vaepatch_test_attr", 1),  # builtin type: setattr raises TypeError
    ])
    with pytest.raises(TypeError):
        ps.apply()
    assert not ps.applied
    assert helpers.kl is orig_kl
    assert vars(model.Net)["forward"] is orig_forward
    assert "vaepatch_test_attr" not in vars(int)


def test_fingerprint_of_jit_script_function(upstream):
    helpers, _, root = upstream
    assert isinstance(helpers.kl, torch.jit.ScriptFunction)
    with pytest.raises((TypeError, OSError)):
        inspect.getsource(helpers.kl)  # why fingerprint goes through the module file
    fp = fingerprint(helpers, "kl")
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp != fingerprint(helpers, "plain")

    # Whitespace and comment edits do not change it ...
    reformatted = HELPERS.replace(
        "    return -0.5 + (a - b) ** 2",
        "    # a comment\n\n    return (-0.5   +   (a - b)**2)  # trailing",
    ).replace("def kl(", "# above\ndef kl(")
    assert reformatted != HELPERS
    (root / "helpers.py").write_text(reformatted)
    assert fingerprint(helpers, "kl") == fp
    # ... any code change does.
    (root / "helpers.py").write_text(HELPERS.replace("-0.5", "-0.25"))
    assert fingerprint(helpers, "kl") != fp
    # So does dropping the decorator.
    (root / "helpers.py").write_text(HELPERS.replace("@torch.jit.script\n", ""))
    assert fingerprint(helpers, "kl") != fp


def test_fingerprint_of_methods(upstream):
    _, model, root = upstream
    fp = fingerprint(model.Net, "forward")
    # The method inside class Net, not the top-level function of the same name.
    assert fp != fingerprint(model, "forward")
    assert fingerprint(model.Net, "scale") != fp
    assert fingerprint(model, "Net") != fingerprint(model, "Base")  # classes are definitions too
    (root / "model.py").write_text(
        MODEL.format(pkg=model.__name__.rsplit(".", 1)[0]).replace("kl(x, x + 1)", "kl(x, x + 2)"))
    assert fingerprint(model.Net, "forward") != fp


def test_fingerprint_missing_definition_raises(upstream):
    helpers, model, _ = upstream
    with pytest.raises(PatchError, match=r"helpers\.nope"):
        fingerprint(helpers, "nope")
    with pytest.raises(PatchError, match=r"Net\.nope"):
        fingerprint(model.Net, "nope")
    # Inherited methods and by-value imports are defined elsewhere, not in this owner.
    with pytest.raises(PatchError, match=r"Net\.describe"):
        fingerprint(model.Net, "describe")
    with pytest.raises(PatchError, match=r"model\.kl"):
        fingerprint(model, "kl")
    with pytest.raises(PatchError, match=r"int\.real"):
        fingerprint(int, "real")  # no source file at all


def test_fingerprint_mismatch_raises_and_changes_nothing(upstream):
    helpers, model, _ = upstream
    orig_kl, orig_forward = helpers.kl, vars(model.Net)["forward"]
    good = fingerprint(helpers, "kl")
    found = fingerprint(model.Net, "forward")
    ps = PatchSet([
        Patch(helpers, "kl", _new_kl, fingerprint=good),
        Patch(model.Net, "forward", _new_forward, fingerprint="0123456789abcdef"),
    ], label="fake", pinned_commit="deadbeefcafe")
    with pytest.raises(FingerprintMismatch) as info:
        ps.apply()
    msg = str(info.value)
    assert f"{model.__name__}.Net.forward" in msg
    assert "0123456789abcdef" in msg and found in msg and "deadbeefcafe" in msg
    assert "vaepatch fetch --check" in msg and "strict=False" in msg
    assert f"{helpers.__name__}.kl" not in msg  # the matching one is not reported
    assert isinstance(info.value, PatchError)
    assert not ps.applied
    assert helpers.kl is orig_kl and vars(model.Net)["forward"] is orig_forward


def test_fingerprint_of_vanished_definition_is_a_mismatch(upstream):
    helpers, _, _ = upstream
    ps = PatchSet([Patch(helpers, "gone", 1, fingerprint="0123456789abcdef")])
    with pytest.raises(FingerprintMismatch, match=r"helpers\.gone"):
        ps.apply()
    assert not hasattr(helpers, "gone")


def test_non_strict_warns_and_patches(upstream):
    helpers, _, _ = upstream
    orig = helpers.kl
    ps = PatchSet([Patch(helpers, "kl", _new_kl, fingerprint="0123456789abcdef")], pinned_commit="abc123")
    with pytest.warns(FingerprintWarning, match=r"(?s)helpers\.kl.*0123456789abcdef.*abc123"):
        ps.apply(strict=False)
    assert issubclass(FingerprintWarning, UserWarning)
    assert ps.applied and helpers.kl is _new_kl
    ps.revert()
    assert helpers.kl is orig


def test_matching_fingerprints_apply_without_warning(upstream):
    helpers, model, _ = upstream
    ps = PatchSet([
        Patch(helpers, "kl", _new_kl, fingerprint=fingerprint(helpers, "kl")),
        Patch(model.Net, "scale", staticmethod(abs), fingerprint=fingerprint(model.Net, "scale")),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.apply()
    assert helpers.kl is _new_kl and model.Net.scale(-4) == 4
    ps.revert()


def test_duplicate_patch_raises(upstream):
    helpers, model, _ = upstream
    with pytest.raises(ValueError, match=r"helpers\.kl"):
        PatchSet([Patch(helpers, "kl", _new_kl), Patch(helpers, "kl", abs)])
    # Same attribute name on different owners is fine.
    ps = PatchSet([Patch(helpers, "kl", _new_kl), Patch(model, "kl", _new_kl)])
    assert len(ps.patches) == 2


def test_revert_runs_in_reverse_order():
    log = []

    class Recording(type):
        def __setattr__(cls, name, value):
            log.append(("set", name))
            super().__setattr__(name, value)

        def __delattr__(cls, name):
            log.append(("del", name))
            super().__delattr__(name)

    class Owner(metaclass=Recording):
        a = 1

    ps = PatchSet([Patch(Owner, "a", 10), Patch(Owner, "b", 20)]).apply()
    assert log == [("set", "a"), ("set", "b")]
    log.clear()
    ps.revert()
    assert log == [("del", "b"), ("set", "a")]
    assert vars(Owner)["a"] == 1 and "b" not in vars(Owner)
