"""The shape of the tree: imports among megatron/, tools/ and tasks/ run one
way (no cycle, counting imports inside functions too) and no Python file
there passes 650 lines. Read from the source with `ast`: nothing is imported.

When this fails with a cycle, untie it by moving the piece both sides need
into a module below both (ARCHITECTURE.md's layers); never import upward.
"""

import ast
import os
from typing import Dict, List, Set

from tests.distributed.launcher import ROOT

PACKAGES = ("megatron", "tools", "tasks")
MAX_LINES = 650


def module_files(root: str) -> Dict[str, str]:
    """{dotted module name: path} of every .py file under PACKAGES (a package by its own name)."""
    found = {}
    for top in PACKAGES:
        for folder, _, names in os.walk(os.path.join(root, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    found[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def import_edges(root: str) -> Dict[str, Set[str]]:
    """{module: the project modules it imports}, wherever the import statement is.
    `from a.b import c` names a.b.c when that is a module, else a.b; relative
    imports resolve against the importing module's package."""
    modules = module_files(root)
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges[module] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in modules:
                        edges[module].add(target)
                    elif base in modules:
                        edges[module].add(base)
        edges[module].discard(module)
    return edges


def import_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle():
    edges = import_edges(ROOT)
    cycles = import_cycles(edges)
    described = []
    for cycle in cycles:
        inside = set(cycle)
        arrows = [f"{a} -> {b}" for a in cycle for b in sorted(edges[a] & inside)]
        described.append(f"cycle of {len(cycle)}: {', '.join(cycle)} ({'; '.join(arrows[:12])})")
    assert not cycles, "imports must run one way; move the shared piece below both:\n" + "\n".join(described)


T = "megatron.training."
LEAVES = (T + "sizes", T + "fileio", T + "sharding", T + "models.hf_names")  # import nothing of ours
FLAG_MODULES = (T + "checkpoint.flags", T + "peft.arguments", T + "kernels.flags", T + "exit_signal",
                T + "bert.arguments")
# (modules whose name starts with this, may not import modules whose name starts with this, why)
FORBIDDEN = (
    [(leaf, "megatron.", "a leaf imports nothing of this project") for leaf in LEAVES]
    + [(flags, T + "arguments", "feature flags sit below the parser, which composes them") for flags in FLAG_MODULES]
    + [(T + "checkpoint.", T + "peft.checkpoint", "adapter checkpoints are a client of the checkpoint package"),
       (T + "checkpoint.", T + "checkpoint_convert", "the converters are a client of the checkpoint package"),
       (T + "peft.", T + "checkpoint_convert", "adapters take HF names from models/hf_names.py, not a converter")]
)


def test_imports_follow_the_layers():
    edges = import_edges(ROOT)
    wrong = [f"{m} imports {n}: {why}" for m, targets in sorted(edges.items()) for n in sorted(targets)
             for importer, imported, why in FORBIDDEN if m.startswith(importer) and n.startswith(imported)]
    assert not wrong, "\n".join(wrong)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check itself: a two-module cycle through a function-level import is found."""
    pkg = tmp_path / "megatron" / "training"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from megatron.training import b\n")
    (pkg / "b.py").write_text("def f():\n    from megatron.training.a import x\n")
    (pkg / "c.py").write_text("from megatron.training import a\n")
    assert import_cycles(import_edges(str(tmp_path))) == [["megatron.training.a", "megatron.training.b"]]


def test_no_file_over_650_lines():
    long = {}
    for path in module_files(ROOT).values():
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if count > MAX_LINES:
            long[os.path.relpath(path, ROOT)] = count
    assert not long, f"split these by concern (at most {MAX_LINES} lines each): {long}"
