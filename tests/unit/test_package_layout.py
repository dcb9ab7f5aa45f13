"""Imports only go downward between the weight packages, and none of their modules import in a circle.

``formats`` (file formats) sits below both ``weights`` (HF <-> Megatron mappings and
conversion) and ``rollout`` (engine client, server); ``rollout.sync`` (trainer -> engine
weight sync) sits on ``rollout`` and ``formats``; ``train`` sits on all of them. Every
import counts, including the ones deferred into function bodies. Read from the source
with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "megatron_sdpg")

# concern -> the concerns it may import (besides itself)
ALLOWED = {
    "formats": set(),
    "weights": {"formats"},
    "rollout": {"formats"},
    "rollout.sync": {"rollout", "formats"},
}
# ``formats`` imports nothing else of megatron_sdpg; none of them imports these.
ABOVE = ("megatron_sdpg.train", "megatron_sdpg.eval", "megatron_sdpg.eval_files", "megatron_sdpg.tiny",
         "megatron_sdpg.plan")


def concern(module: str) -> str | None:
    """``megatron_sdpg.rollout.sync.disk`` -> ``rollout.sync``; None outside the four packages."""
    parts = module.split(".")[1:]
    if parts[:2] == ["rollout", "sync"]:
        return "rollout.sync"
    if parts and parts[0] in ("formats", "weights", "rollout"):
        return parts[0]
    return None


def module_files(pkgs=("formats", "weights", "rollout")) -> dict[str, str]:
    """``{dotted module name: file path}`` of every module in ``pkgs``."""
    out = {}
    for pkg in pkgs:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out["megatron_sdpg." + rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def _is_module(name: str) -> bool:
    path = os.path.join(ROOT, *name.split(".")[1:])
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def imports_of(module: str, path: str) -> list[tuple[str, int]]:
    """Every ``megatron_sdpg`` module ``module`` imports (anywhere in the file), with the line."""
    is_pkg = path.endswith("__init__.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "megatron_sdpg"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "megatron_sdpg":
                continue
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{base}.{a.name}"
                out.append((sub if _is_module(sub) else base, node.lineno))
    return out


def layering_violations(modules: dict[str, str]) -> list[str]:
    bad = []
    for mod, path in sorted(modules.items()):
        src = concern(mod)
        for target, line in imports_of(mod, path):
            dst = concern(target)
            where = f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line}: {mod} imports {target}"
            if any(target == a or target.startswith(a + ".") for a in ABOVE):
                bad.append(f"{where} (above it)")
            elif src == "formats" and dst != "formats":
                bad.append(f"{where} (formats imports nothing else of megatron_sdpg)")
            elif dst is not None and dst != src and dst not in ALLOWED[src]:
                bad.append(f"{where} ({src} may import only {sorted(ALLOWED[src]) or 'nothing'} of these)")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    graph = {}
    for mod, path in modules.items():
        # a package's ``__init__`` importing its own submodules is no circle
        graph[mod] = {t for t, _ in imports_of(mod, path) if t in modules and t != mod}
    return graph


def test_the_weight_packages_exist():
    modules = module_files()
    for name in ("megatron_sdpg.formats.safetensors_format", "megatron_sdpg.formats.tensor_codec",
                 "megatron_sdpg.weights.mapping_base", "megatron_sdpg.rollout.sync.disk",
                 "megatron_sdpg.rollout.process_group"):
        assert name in modules, name
    weights_sync = [m for m in modules if concern(m) == "weights" and m.rsplit(".", 1)[1].startswith("sync")]
    assert not weights_sync, f"the weight sync belongs to rollout.sync: {weights_sync}"


def test_imports_only_go_downward():
    bad = layering_violations(module_files())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The checkers themselves: a planted circle and a planted upward import are reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
    up = tmp_path / "up.py"
    up.write_text("def f():\n    from megatron_sdpg.rollout.sync.base import ProbeCheck\n")
    bad = layering_violations({"megatron_sdpg.formats.up": str(up)})
    assert len(bad) == 1 and "rollout.sync.base" in bad[0] and ":2:" in bad[0]
    bad = layering_violations({"megatron_sdpg.rollout.up": str(up)})
    assert len(bad) == 1 and "rollout may import only ['formats']" in bad[0]


@pytest.mark.parametrize("tool", ["convert_hf_to_megatron.py", "convert_megatron_to_hf.py"])
def test_the_converter_clis_import_existing_modules(tool):
    """The public CLI names stay: every ``megatron_sdpg`` module the tools import exists."""
    path = os.path.join(ROOT, "..", "tools", tool)
    targets = imports_of("tools." + tool[:-3], path)
    assert targets
    for target, line in targets:
        assert _is_module(target), f"tools/{tool}:{line}: {target} does not exist"
