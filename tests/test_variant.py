"""Variants: built-ins, inline specs, TOML files, round trips, errors, and the wheel's contents."""
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from vaepatch import OU, Variant, scales, variants
from vaepatch.variant import SIDES

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

BUILTINS = {
    # name: (posterior, prior) as scale specs, None = the upstream's own
    "vanilla": (None, None),
    "upbounded1": ("upbounded(1)", "upbounded(1)"),
    "explin": ("explin", "explin"),
    "vanilla-cst1": (None, "constant(1)"),
    "upbounded1-cst1": ("upbounded(1)", "constant(1)"),
    "explin-cst1": ("explin", "constant(1)"),
    # beyond the paper
    "softplus-ln2": ("softplus(log(2))", "softplus(log(2))"),
    "upbounded1-floor": ("upbounded(1)", "bounded(0.01, 1)"),
    "qfloor-cst1": ("bounded(1e-5, 1)", "constant(1)"),
    "qfloor-floor": ("bounded(1e-5, 1)", "bounded(0.01, 1)"),
}

ACCEPTED_VARIANT_NAMES = sorted(BUILTINS)


def _sides(v):
    return tuple(getattr(v, side) for side in SIDES) + (v.ou,)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_sides(name):
    v = Variant.parse(name)
    post, prior = BUILTINS[name]
    assert v.name == name
    assert v.posterior == (scales.get(post) if post else None)
    assert v.prior == (scales.get(prior) if prior else None)
    assert v.decoder is None and v.ou is None
    assert v.is_vanilla == (name == "vanilla")
    # the description is the shipped file's own line, read here without the registry
    shipped = tomllib.loads((REPO / "vaepatch" / "patches" / f"{name}.toml").read_text())["description"]
    assert shipped.strip() and v.description == shipped and variants()[name] == shipped
    assert Variant.parse(name.upper()) == v  # names are case-insensitive


def test_variants_lists_exactly_the_builtins():
    listed = variants()
    assert isinstance(listed, dict)
    assert sorted(listed) == sorted(BUILTINS)
    for name, description in listed.items():
        assert isinstance(description, str) and description.strip()
        assert "\n" not in description, f"{name}: description must be one line"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_round_trip_builtins(name):
    v = Variant.parse(name)
    again = Variant.parse(v.spec)
    assert _sides(again) == _sides(v)


def test_inline_specs():
    v = Variant.parse("posterior=explin,prior=cst1")
    assert v.posterior == scales.get("explin") and v.prior == scales.get("constant(1)")
    assert v.decoder is None and v.ou is None
    assert _sides(v) == _sides(Variant.parse("explin-cst1"))

    # a comma inside parentheses belongs to the scale spec
    v = Variant.parse("posterior=bounded(0.1, 1),prior=upstream")
    assert v.posterior == scales.get("bounded(0.1, 1)") and v.posterior.args == (0.1, 1.0)
    assert v.prior is None and v.decoder is None

    v = Variant.parse("upbounded1,ou=0.9x5")
    assert v.posterior == v.prior == scales.get("upbounded1")
    assert v.ou == OU(0.9, 5)
    # a built-in base keeps its description
    assert v.description == "UpBounded(1) for posterior and prior scales: sigma < 1, stable KL"

    v = Variant.parse("upbounded1,ou=0.95")
    assert v.ou == OU(0.95, 5) and v.ou.samples == 5

    v = Variant.parse("prior=cst1,ou=0.95x10")
    assert v.posterior is None and v.prior == scales.get("cst1") and v.ou == OU(0.95, 10)

    v = Variant.parse("explin,prior=cst1,decoder=bounded(1/(256*sqrt(12)), 1)")
    assert v.posterior == scales.get("explin") and v.prior == scales.get("cst1")
    assert v.decoder == scales.get("bounded(1/(256*sqrt(12)), 1)")
    # a base's side can be handed back to the upstream
    assert Variant.parse("upbounded1,prior=upstream").prior is None


@pytest.mark.parametrize("spec", [
    "posterior=explin,prior=cst1", "posterior=bounded(0.1, 1),prior=upstream", "upbounded1,ou=0.9x5",
    "upbounded1,ou=0.95", "prior=cst1,ou=0.95x10", "posterior=softplus(2.5),decoder=downbounded(1e-05)",
    "explin,ou=0.123456789x3", "upbounded1,ou=1x1", "vanilla-cst1,ou=0x2",
    "posterior=bounded(1/(256*sqrt(12)), 1)",
])
def test_round_trip_inline(spec):
    v = Variant.parse(spec)
    again = Variant.parse(v.spec)
    assert _sides(again) == _sides(v), (v.spec, again.spec)
    assert again.spec == v.spec


def test_variant_object_passes_through():
    v = Variant.parse("upbounded1")
    assert Variant.parse(v) is v


def test_toml_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '# a custom variant\n'
        'description = "explin q, unit prior, bounded pixels, OU"\n'
        'posterior = "explin"\n'
        'prior = "cst1"\n'
        'decoder = "bounded(1/(256*sqrt(12)), 1)"\n'
        '[ou]\n'
        'rho = 0.9\n'
        'samples = 7\n'
    )
    for given in (str(path), path):
        v = Variant.parse(given)
        assert v.name == "mine"
        assert v.description == "explin q, unit prior, bounded pixels, OU"
        assert v.posterior == scales.get("explin") and v.prior == scales.get("constant(1)")
        assert v.decoder == scales.get("bounded") and v.decoder.args[0] == pytest.approx(scales.PIXEL_ALPHA)
        assert v.ou == OU(0.9, 7)
        assert _sides(Variant.parse(v.spec)) == _sides(v)

    minimal = tmp_path / "sub" / "vanillaish.toml"
    minimal.parent.mkdir()
    minimal.write_text('prior = "upstream"\n[ou]\nrho = 0.5\n')
    v = Variant.parse(str(minimal))
    assert v.posterior is None and v.prior is None and v.ou == OU(0.5, 5)


def test_builtin_toml_files_parse_directly():
    from importlib import resources
    folder = resources.files("vaepatch") / "patches"
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(".toml"))
    assert names == sorted(f"{n}.toml" for n in BUILTINS)
    for name in BUILTINS:
        with resources.as_file(folder / f"{name}.toml") as p:
            assert _sides(Variant.parse(str(p))) == _sides(Variant.parse(name))


def test_ou_object():
    assert OU.parse("0.9x5") == OU(0.9, 5) == OU.parse({"rho": 0.9, "samples": 5}) == OU.parse("0.9")
    assert OU.parse(OU(0.3, 2)) == OU(0.3, 2)
    assert OU.parse(OU(0.123456789, 3).spec) == OU(0.123456789, 3)
    assert OU(1.0).samples == 5


# ----------------------------------------------------------------------------------------
# Errors: a ValueError naming the problem and listing what is accepted
# ----------------------------------------------------------------------------------------

KEYS = ["posterior", "prior", "decoder", "ou"]


def _raises(spec):
    with pytest.raises(ValueError) as info:
        Variant.parse(spec)
    return str(info.value)


def _lists_builtins(msg):
    return all(n in msg for n in ACCEPTED_VARIANT_NAMES)


def _lists_keys(msg):
    return "accepted keys" in msg and all(k in msg for k in KEYS)


def _lists_scales(msg):
    return "accepted" in msg and all(n in msg for n in ["explin", "upbounded", "bounded", "constant", "softclamp"])


@pytest.mark.parametrize("spec,problem,lists", [
    ("nope", "unknown variant 'nope'", _lists_builtins),
    ("nope,ou=0.9", "unknown variant 'nope'", _lists_builtins),
    ("upbounded1,nope", "malformed variant item 'nope'", _lists_builtins),
    ("posterior=", "malformed variant item 'posterior='", _lists_builtins),
    ("posterior=explin,,prior=cst1", "malformed variant item ''", _lists_builtins),
    ("posterior=explin,foo=1", "unknown variant key 'foo'", _lists_keys),
    ("=explin", "unknown variant key ''", _lists_keys),
    ("posterior=explin,posterior=exp", "given twice", _lists_keys),
    ("posterior=nope", "unknown scale parameterization 'nope'", _lists_scales),
    ("prior=upbounded(", "malformed scale spec", _lists_scales),
    ("posterior=upbounded(0)", "omega must be", _lists_scales),
    ("posterior=upbounded(-2)", "omega must be", _lists_scales),
    ("decoder=bounded(1, 0.5)", "alpha < omega", _lists_scales),
    ("decoder=bounded(0.5, 0.5)", "alpha < omega", _lists_scales),
    ("prior=cst0", "c must be", _lists_scales),
    ("upbounded1,ou=1.5", "rho must be a number in [0, 1]", None),
    ("upbounded1,ou=-0.1", "rho must be a number in [0, 1]", None),
    ("upbounded1,ou=nan", "rho must be a number in [0, 1]", None),
    ("upbounded1,ou=0.9x0", "samples must be an integer >= 1", None),
    ("upbounded1,ou=0.9x-1", "samples must be an integer >= 1", None),
    ("upbounded1,ou=0.9x2.5", "malformed ou spec '0.9x2.5'", None),
    ("upbounded1,ou=abc", "malformed ou spec 'abc'", None),
    ("", "empty variant spec", _lists_builtins),
    ("   ", "empty variant spec", _lists_builtins),
    (5, "must be a string, path or Variant", _lists_builtins),
    (None, "must be a string, path or Variant", _lists_builtins),
])
def test_bad_specs(spec, problem, lists):
    msg = _raises(spec)
    assert problem in msg, msg
    if lists is not None:
        assert lists(msg), msg
    else:  # ou errors state the accepted form or range themselves
        assert "[0, 1]" in msg or ">= 1" in msg or "RHOxSAMPLES" in msg, msg
    if isinstance(spec, str) and spec.strip() and spec != "=explin":
        assert spec in msg or spec.split(",")[-1] in msg  # the offending text is quoted


def test_bad_ou_objects():
    for args, problem in [((1.5,), "[0, 1]"), ((-1e-9,), "[0, 1]"), ((0.5, 0), ">= 1"), ((0.5, 2.5), "integer"),
                          ((0.5, True), "integer"), (("0.5",), "[0, 1]")]:
        with pytest.raises(ValueError, match="ou ") as info:
            OU(*args)
        assert problem in str(info.value)
    with pytest.raises(ValueError, match=r"unknown ou key.*accepted: rho, samples"):
        OU.parse({"rh": 0.5})
    with pytest.raises(ValueError, match="needs 'rho'"):
        OU.parse({"samples": 3})


def _toml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,problem,lists", [
    ('posterior = "explin"\nfoo = 1\n', "unknown key(s) ['foo']", _lists_keys),
    ('posterior = "explin\n', "not valid TOML", _lists_keys),
    ('posterior = = "x"\n', "not valid TOML", _lists_keys),
    ('posterior = 1\n', "posterior must be a scale spec string or 'upstream'", None),
    ('prior = "upbounded(0)"\n', "omega must be", _lists_scales),
    ('prior = "nope"\n', "unknown scale parameterization", _lists_scales),
    ('[ou]\nrho = 2\n', "rho must be a number in [0, 1]", None),
    ('[ou]\nrho = 0.5\nsamples = 0\n', "samples must be an integer >= 1", None),
    ('[ou]\nrho = 0.5\nsamples = 2.5\n', "samples must be an integer >= 1", None),
    ('[ou]\nrh = 0.5\n', "unknown ou key(s) ['rh']; accepted: rho, samples", None),
])
def test_bad_toml(tmp_path, text, problem, lists):
    path = _toml(tmp_path, "bad.toml", text)
    msg = _raises(path)
    assert problem in msg, msg
    assert path in msg  # names the file
    if lists is not None:
        assert lists(msg), msg


def test_missing_toml(tmp_path):
    path = str(tmp_path / "absent.toml")
    msg = _raises(path)
    assert "does not exist" in msg and path in msg and _lists_builtins(msg)
    msg = _raises(str(tmp_path / "dir" / "absent"))  # a path without .toml is still a path
    assert "does not exist" in msg and _lists_builtins(msg)


# ----------------------------------------------------------------------------------------
# Packaging: the wheel carries the built-in variants and the upstream pins
# ----------------------------------------------------------------------------------------


def _copy_tree(dst):
    """The repository's package sources, without build leftovers (a stale build/lib could
    otherwise put files in the wheel that the sources no longer have)."""
    import shutil

    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".git", ".pytest_cache",
                                    ".benchmarks", "third_party", "tests", "run_scripts", ".venv", "*.pyc")
    for item in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "setup.py"):
        if (REPO / item).exists():
            shutil.copy2(REPO / item, dst / item)
    shutil.copytree(REPO / "vaepatch", dst / "vaepatch", ignore=ignore)


def test_wheel_contains_patches_and_pins(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _copy_tree(src)
    out = tmp_path / "wheel"
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    except subprocess.TimeoutExpired:  # pragma: no cover
        pytest.skip("building the wheel took over 120 s on this machine")
    elapsed = time.monotonic() - start
    if elapsed > 20 and os.environ.get("VAEPATCH_SLOW") != "1":  # pragma: no cover
        pytest.skip(f"wheel build took {elapsed:.0f} s (> 20 s); set VAEPATCH_SLOW=1 to require it")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("vaepatch-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
        for name in BUILTINS:
            assert f"vaepatch/patches/{name}.toml" in names, sorted(names)
        assert "vaepatch/upstream_pins.toml" in names
        assert "vaepatch/scales.py" in names and "vaepatch/variant.py" in names
        # the shipped files are the sources' own
        for name in BUILTINS:
            assert zf.read(f"vaepatch/patches/{name}.toml") == (REPO / "vaepatch" / "patches" / f"{name}.toml").read_bytes()
