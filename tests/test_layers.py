"""Layering of ``spo_kernels``, read from the source (the AST of every module): the kernels are the
bottom layer (no import of the layers above them), and no chain of imports leads a module back to
itself. Function-level imports count too (they run later, but a cycle through them is still a cycle);
``top_level_only`` restricts a graph to import-time statements."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "spo_kernels"
# What the kernel files must not import: the layers above them.
ABOVE_KERNELS = ("spo_kernels.backends", "spo_kernels.api", "spo_kernels.autograd", "spo_kernels.modules")


def _modules(root=PKG):
    """``{dotted name: path}`` of every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level_names(path):
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _targets(node, name, is_pkg, modules):
    """Modules of the package one import statement loads. ``from x import y``: the module ``x.y`` if
    there is one, else ``x`` when ``y`` is a name defined in it, else nothing (``y`` is a compiled
    submodule such as ``spo_kernels._cpu``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    found = set()
    for a in node.names:
        if f"{base}.{a.name}" in modules:
            found.add(f"{base}.{a.name}")
        elif base in modules and (a.name == "*" or a.name in _top_level_names(modules[base])):
            found.add(base)
    return found


def _imports(name, path, modules, top_level_only):
    """Modules of the package that ``name`` imports (module-level statements only, or all of them)."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    if top_level_only:
        nodes, todo = [], list(tree.body)
        while todo:  # module level: the body and its if / try / with blocks, not functions or classes
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            nodes.append(node)
            todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)
                        or isinstance(c, ast.excepthandler))
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.excepthandler):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _targets(node, name, is_pkg, modules)
    return found - {name}


def import_graph(root=PKG, top_level_only=False):
    modules = _modules(root)
    return {name: _imports(name, path, modules, top_level_only) for name, path in modules.items()}


def upward_imports(graph):
    return sorted((m, t) for m, ts in graph.items() if m.startswith("spo_kernels.kernels")
                  for t in ts if t.startswith(ABOVE_KERNELS))


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_kernels_import_nothing_above_them():
    graph = import_graph()
    assert "spo_kernels.kernels.linear_backward" in graph  # the walk sees the kernel files
    assert upward_imports(graph) == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_checks_catch_a_bad_import(tmp_path):
    """The two checks on a copy of the package with one upward import added to a kernel file."""
    import shutil
    copy = tmp_path / "spo_kernels"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    f = copy / "kernels" / "triton_helpers.py"
    f.write_text(f.read_text() + "\n\ndef _late():\n    from ..backends import Backend  # noqa: F401\n")
    assert ("spo_kernels.kernels.triton_helpers", "spo_kernels.backends") in upward_imports(import_graph(copy))
    # A module-level import of linear_backward from triton_helpers closes a cycle at import time.
    f.write_text(f.read_text() + "\nfrom . import linear_backward  # noqa: E402,F401\n")
    cycle = find_cycle(import_graph(copy, top_level_only=True))
    assert cycle is not None and "spo_kernels.kernels.triton_helpers" in cycle
