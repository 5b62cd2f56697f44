"""The package's modules import each other without a cycle (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lightning_matlora"


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports (``from .x import y``, ``from . import x``, ``import pkg.x``)."""
    modules = {f.stem for f in PKG.glob("*.py")} - {"__init__", "__main__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((PKG / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_matlora."):
                targets = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("lightning_matlora.")]
            else:
                continue
            deps |= {t for t in targets if t in modules}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert {"callback", "adapter_format", "distributed"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ------------------------------------------------------------------------------------------------- the layers
#: The package's layers, bottom up (docs/architecture.md): a module imports only from its own layer or below.
LAYERS = {
    "core": {"version", "scaling", "config", "curve", "atomic", "zero_stage", "quantized", "rank", "distill", "layer",
             "layer_ranks", "model_state", "rank_allocation",
             "inject", "adapted_model", "nesting", "summary", "metric",
             "control"},  # control: the deprecated name of adapted_model
    "files": {"adapter_format", "adapter_state", "adapter_save", "adapter_load", "peft_lora", "export", "nest_peft",
              "base_model", "output_dir", "text_loss", "gguf_base", "rank_plan"},
    "lightning": {"isolation", "distributed", "rank_validation", "adapter_checkpoint", "callback",
                  "evaluation"},  # evaluation: the deprecated name of rank_validation
    "entry": {"cli", "quiet"},
}
#: imports that break the layering today, each with the issue that removes it (none left)
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS.values()):
        if module in names:
            return i
    raise AssertionError(f"lightning_matlora/{module}.py is in no layer: add it to LAYERS and docs/architecture.md")


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = import_graph()
    upward = {(a, b) for a, deps in graph.items() for b in deps if _layer_of(b) > _layer_of(a)}
    assert upward <= KNOWN_UPWARD, sorted(upward - KNOWN_UPWARD)


def test_the_architecture_page_lists_what_each_module_imports():
    """docs/architecture.md's tables of the core and files layers name exactly the package modules each imports."""
    import re

    graph = import_graph()
    rows = re.findall(r"^\| `(\w+)\.py` \| .* \| ([^|]*) \|$", (PKG.parent / "docs" / "architecture.md").read_text(),
                      flags=re.M)
    assert len(rows) >= 20
    for name, deps in rows:
        listed = set() if deps.strip() == "—" else set(re.findall(r"\b(\w+)\b", re.sub(r"\(.*?\)", "", deps)))
        assert listed == graph[name], f"{name}: the page lists {sorted(listed)}, the code imports {sorted(graph[name])}"


def _top_level_imports(name: str) -> set[str]:
    tree = ast.parse((PKG / f"{name}.py").read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_lightning_layer_imports_lightning_at_import_time():
    below = set().union(LAYERS["core"], LAYERS["files"], {"distributed", "isolation"})
    importing = sorted(m for m in below if {"lightning", "pytorch_lightning"} & _top_level_imports(m))
    assert importing == [], importing


def test_no_module_writes_another_objects_private_attributes():
    """``x._name = ...`` and ``setattr(x, "_name", ...)`` only on ``self``: objects talk through public names."""
    offending = []
    for path in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr.startswith("_") and not t.attr.startswith("__") \
                        and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")):
                    offending.append(f"{path.name}:{node.lineno} {ast.unparse(t)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("setattr", "object.__setattr__") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and str(node.args[1].value).startswith("_") and ast.unparse(node.args[0]) != "self":
                offending.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert offending == [], offending


#: private names a module still imports from another, each with why it is left (none may be added)
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def test_no_module_imports_another_modules_private_names():
    """``from .x import _y`` reaches into ``x``'s internals: a name another module needs is public in ``x``."""
    found = set()
    for path in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                found |= {(node.module, a.name) for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")}
    assert found <= KNOWN_PRIVATE_IMPORTS, sorted(found - KNOWN_PRIVATE_IMPORTS)


def test_renamed_modules_still_import_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    for old, new, name in (("control", "adapted_model", "set_rank"), ("evaluation", "rank_validation", "step_loss")):
        sys.modules.pop(f"lightning_matlora.{old}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(f"lightning_matlora.{old}")
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
        assert getattr(module, name) is getattr(importlib.import_module(f"lightning_matlora.{new}"), name)
