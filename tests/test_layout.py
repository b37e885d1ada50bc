"""The package's shape, read from its imports with ``ast``: no cycle, the core knows no upstream,
the targets do not know each other, every module stays small, and every target keeps the protocol.

Every import counts, those inside functions too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vaepatch"
# The math, the variants, the engine, what every launcher shares and the report: no upstream here.
CORE = ("vaepatch.scales", "vaepatch.gaussian", "vaepatch.ou", "vaepatch.variant", "vaepatch.patching",
        "vaepatch.precision", "vaepatch.blockmath", "vaepatch.compare", "vaepatch.runs")
# Generic helpers the core may use (they know no upstream either).
CORE_HELPERS = ("vaepatch.upstream", "vaepatch.git_clone", "vaepatch.version", "vaepatch.cifar_format",
                "vaepatch.markdown")
MAX_LINES = 420  # "no module over ~400 lines"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str, node: ast.AST, is_package: bool) -> list:
    """The vaepatch modules one import statement names (``from pkg import sub`` names ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    names = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        names.append(candidate if candidate in MODULES else base)
    return names


def _graph() -> dict:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _resolve(module, node, path.name == "__init__.py"):
                    while name and name not in MODULES and "." in name:  # `import a.b.c` of a non-module attribute
                        name = name.rsplit(".", 1)[0]
                    if name in MODULES and name != module:
                        edges.add(name)
        graph[module] = edges
    return graph


GRAPH = _graph()


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_graph_sees_the_imports_it_should():
    """The reader is not vacuous: known edges, including a relative and a function-level import, are found."""
    assert "vaepatch.scales" in GRAPH["vaepatch.variant"]
    assert "vaepatch.precision" in GRAPH["vaepatch.gaussian"]
    assert "vaepatch.api" in GRAPH["vaepatch.targets.vdvae.launch"]
    assert "vaepatch.targets.vdvae.tiny" in GRAPH["vaepatch.targets.vdvae.steptime"]
    assert len(MODULES) > 40


def test_no_import_cycle():
    """Tarjan's strongly connected components: any component with more than one module is a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _core(module: str) -> bool:
    return any(_within(module, c) for c in CORE)


def test_core_imports_only_core_and_generic_helpers():
    bad = {m: sorted(e for e in edges if not (_core(e) or e in CORE_HELPERS))
           for m, edges in GRAPH.items() if _core(m)}
    bad = {m: e for m, e in bad.items() if e}
    assert not bad, f"core modules importing outside the core (targets, benches, CLI...): {bad}"


def test_core_helpers_know_no_target():
    bad = {m: sorted(e for e in GRAPH[m] if _within(e, "vaepatch.targets")) for m in CORE_HELPERS if m in GRAPH}
    assert not any(bad.values()), bad


def test_targets_do_not_import_each_other():
    from vaepatch import targets

    for name in targets.NAMES:
        mine = f"vaepatch.targets.{name}"
        for module, edges in GRAPH.items():
            if _within(module, mine):
                others = [e for e in edges if _within(e, "vaepatch.targets") and not _within(e, mine)
                          and e != "vaepatch.targets"]
                assert not others, f"{module} imports another target: {others}"


def test_cross_target_bench_helpers_know_no_target():
    for module in ("vaepatch.bench.cost.timing", "vaepatch.bench.cost.measure"):
        assert not [e for e in GRAPH[module] if _within(e, "vaepatch.targets")], module


def test_no_module_is_long():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_no_line_over_120_characters():
    wide = [f"{m}:{i}" for m, p in MODULES.items() for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > 120]
    assert not wide, f"lines over 120 characters (wrap them): {wide}"


def test_every_pin_has_a_target_folder_that_keeps_the_protocol():
    from vaepatch import targets, upstream
    from vaepatch.runs import logs

    folders = {p.name for p in (PACKAGE / "targets").iterdir() if (p / "__init__.py").is_file()}
    assert folders == {n for n, p in upstream.PINS.items() if not p.library} == set(targets.NAMES)
    assert all(need in upstream.PINS and upstream.PINS[need].library for n in targets.NAMES
               for need in upstream.pin(n).needs)  # a target's libraries are pinned, and no targets
    for name in targets.NAMES:
        package = targets.package(name)
        assert package.NAME == name and "/" in package.REPO
        assert tuple(package.MODULES) == upstream.pin(name).modules
        assert callable(targets.part(name, "patch").build)
        assert targets.part(name, "shims").SHIMS and callable(targets.part(name, "shims").install)
        launch = targets.part(name, "launch")
        assert callable(launch.add_arguments) and callable(launch.run_from_args)
        assert logs.for_target(name) is targets.part(name, "logs").UPSTREAM_LOG
        for bench, module in getattr(package, "BENCHES", {}).items():
            assert _within(module, f"vaepatch.targets.{name}") and callable(importlib.import_module(module).main), bench
    with pytest.raises(ValueError, match="supported: vdvae, nvae, effvdvae"):
        targets.package("efficient_vdvae")
    with pytest.raises(ValueError, match="unknown target 'hparams'"):  # a library, no target
        targets.package("hparams")


@pytest.mark.parametrize("old", ["vaepatch.compat", "vaepatch.events", "vaepatch.launch", "vaepatch.launch_nvae"])
def test_the_pre_layout_import_paths_are_gone(old):
    """Nothing was released under them: one place per module (vaepatch.runs.*, vaepatch.targets.<name>.*)."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
