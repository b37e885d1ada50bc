"""Running an upstream script's ``if __name__ == "__main__":`` block from inside vaepatch.

A launcher loads the script's definitions first, wraps what it needs (the training step, the grad
scaler), then runs the block itself: the upstream code runs unedited, as its own ``__main__``.
"""
from __future__ import annotations

import ast
import builtins
import types
from pathlib import Path

__all__ = ["load_script"]


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either quote style, either operand order)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return False
    sides = [node.test.left, *node.test.comparators]
    return ({type(side) for side in sides} == {ast.Name, ast.Constant}
            and {getattr(side, "id", getattr(side, "value", None)) for side in sides} == {"__name__", "__main__"})


def load_script(path: Path) -> tuple[types.ModuleType, types.CodeType]:
    """Execute a script's definitions without its ``if __name__ == "__main__":`` block, so the
    launcher can wrap functions before anything runs; returns the module (``__name__`` set to
    ``"__main__"`` afterwards) and the block's body, compiled, for ``exec(guard, module.__dict__)``.
    Line numbers in tracebacks are the script's own.
    """
    path = Path(path)
    tree = ast.parse(path.read_text(), str(path))
    guards = [node for node in tree.body if _is_main_guard(node)]
    definitions = ast.Module([node for node in tree.body if node not in guards], type_ignores=[])
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=str(path), __builtins__=builtins, __name__="__vaepatch_train__")
    exec(compile(definitions, str(path), "exec"), module.__dict__)
    module.__name__ = "__main__"
    guard = ast.Module([stmt for node in guards for stmt in node.body], type_ignores=[])
    return module, compile(guard, str(path), "exec")
