"""The layering rules of docs/ARCHITECTURE.md ("Layering"), checked over every import in the package,
those inside functions included: a lazy import is still a dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ipu_app"
LEAVES = ("choices", "seeding", "io", "machine", "signals")

# module prefix -> the ipu_app modules (prefixes) it may import; None: any, minus FORBIDDEN.
ALLOWED = {
    **{leaf: () for leaf in LEAVES},
    "rundir": ("config", "io"),
    "sparse": ("choices", "seeding", "io", "sparse"),
    "ops": ("choices", "io", "machine", "sparse", "ops"),
    "data": ("choices", "seeding", "io", "data"),
    "model": ("choices", "seeding", "io", "sparse", "ops", "model"),
    "config": ("choices", "config"),
}
FORBIDDEN = {
    "train": ("experiments", "__main__", "ipu", "finetune"),
    "finetune": ("experiments", "__main__", "ipu"),
    "ipu": ("experiments", "__main__"),
    "experiments": ("ipu", "__main__"),
}
EXCEPTIONS: set[tuple[str, str]] = set()  # (importer, imported prefix): none at present
ENTRY_POINTS = ("__main__", "commands")  # only these may import a command
COMMAND_MODULES = ("commands", *(f"commands.{p.stem}" for p in sorted((PACKAGE / "commands").glob("[a-z]*.py"))
                                 if p.stem != "describe"))
TORCH_FREE = ("choices", "config", "rundir", "signals", "sparse.flops", "sparse.schedule", "experiments.sweep",
              "experiments.sweep_spec", "experiments.runs", "experiments.report", "__main__", *COMMAND_MODULES)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {imported ipu_app modules}}``, names relative to the package ("" = the package)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "configs" in path.parts:
            continue
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                    # "from . import ops": the names may be modules themselves
                    targets = [f"{module}.{a.name}".lstrip(".") for a in node.names] if not node.module else [module]
                else:
                    targets = [node.module]
            else:
                continue
            for target in targets:
                if target.startswith("ipu_app"):
                    target = target[len("ipu_app"):].lstrip(".")
                elif node.__class__ is ast.Import or not getattr(node, "level", 0):
                    continue
                found.add(target)
        graph[name] = found
    return graph


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _rule(module: str):
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if _under(module, prefix):
            return prefix
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in graph.items():
        for target in sorted(imported):
            if target == "" or target == module:
                continue
            if any(_under(target, entry) for entry in ENTRY_POINTS) \
                    and not any(_under(module, entry) for entry in ENTRY_POINTS):
                found.append(f"{module} imports the command line {target}")
            prefix = _rule(module)
            if prefix is not None and not any(_under(target, ok) for ok in ALLOWED[prefix]):
                found.append(f"{module} imports {target} (allowed: {', '.join(ALLOWED[prefix]) or 'nothing'})")
            for layer, banned in FORBIDDEN.items():
                if _under(module, layer):
                    for bad in banned:
                        if _under(target, bad) and not any(_under(module, m) and _under(target, t)
                                                           for m, t in EXCEPTIONS):
                            found.append(f"{module} imports {target} ({layer}/ may not import {bad})")
    return found


def folder_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles between top-level folders and modules (``train``, ``config``, ...): each strongly
    connected group of more than one, sorted."""
    edges: dict[str, set[str]] = {}
    for module, imported in graph.items():
        for target in imported:
            a, b = module.split(".")[0], target.split(".")[0]
            if a and b and a != b:
                edges.setdefault(a, set()).add(b)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {node: reach(node) for node in edges}
    groups = {tuple(sorted({node} | {other for other in reachable[node] if node in reachable.get(other, ())}))
              for node in edges}
    return sorted(list(group) for group in groups if len(group) > 1)


def test_no_folder_imports_one_that_imports_it_back():
    assert folder_cycles(import_graph()) == []


def test_a_folder_cycle_is_found():
    graph = {"config": {"model.bert"}, "model.export": {"rundir"}, "rundir": {"config"}, "data.batches": {"io"}}
    assert folder_cycles(graph) == [["config", "model", "rundir"]]


def test_every_layering_rule_holds():
    graph = import_graph()
    assert {"sparse.updater", "ops.cpu", "train.trainer", "experiments.sweep", "rundir"} <= set(graph)
    assert violations(graph) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "model.bert" in graph["train.evaluate"]  # inside load_run_model
    assert "ipu.trainer" in graph["commands.train"]  # inside _train_locked
    assert "ops" in graph["train.trainer"]  # from .. import ops


@pytest.mark.parametrize("module, target, message", [
    ("sparse.updater", "model.bert", "allowed: choices"),
    ("ops.cpu", "config", "allowed: choices, io, machine, sparse, ops"),
    ("data.batches", "sparse.pattern", "allowed"),
    ("experiments.report", "commands.train", "imports the command line"),
    ("train.trainer", "commands", "imports the command line"),
    ("train.trainer", "ipu.trainer", "train/ may not import ipu"),
    ("train.trainer", "experiments.runs", "train/ may not import experiments"),
    ("seeding", "io", "allowed: nothing"),
])
def test_a_broken_rule_is_named(module, target, message):
    found = violations({module: {target}})
    assert found and message in found[0]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_modules_import_without_torch(module):
    code = f"import sys, ipu_app.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
