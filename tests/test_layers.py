"""The folders of avcl/ are its layers, and every import points down (avcl.LAYERS, lowest first).

Read with ``ast`` from the source, so an import inside a function counts as much as one at the top."""
import ast
from pathlib import Path

import pytest

import avcl

PACKAGE = Path(avcl.__file__).resolve().parent
ROOT_MODULES = {"avcl", "avcl.__main__"}  # the package itself (its version, the layer list) and `python -m avcl`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in avcl.LAYERS else None


def imports(path: Path):
    """(target module, line, inside a function, the statement node) for every import of an avcl module."""
    tree = ast.parse(path.read_text())
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            here = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - child.level + 1] + ([base] if base else []))
                if base == "avcl" or base.startswith("avcl."):
                    for alias in child.names:  # `from avcl.x import y`: module avcl.x.y when y is one, else avcl.x
                        target = f"{base}.{alias.name}"
                        found.append((target if target in MODULES else base, child.lineno, here, child))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "avcl" or alias.name.startswith("avcl."):
                        found.append((alias.name, child.lineno, here, child))
            walk(child, here)
    walk(tree, False)
    return found


def test_every_module_is_in_a_layer():
    strays = [m for m in MODULES if m not in ROOT_MODULES and layer_of(m) is None]
    assert not strays, f"modules outside the layers {avcl.LAYERS}: {strays}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == \
        sorted(avcl.LAYERS), "every layer is one package of avcl/, and every package a layer"


def test_every_layer_says_what_it_is_and_what_it_may_import():
    for layer in avcl.LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
        assert doc.startswith(f"Layer ``{layer}``"), f"avcl/{layer}/__init__.py: its docstring starts with the layer"
        assert "import" in doc.lower(), f"avcl/{layer}/__init__.py: its docstring says what the layer may import"


def test_imports_point_down():
    rank = {layer: i for i, layer in enumerate(avcl.LAYERS)}
    upward = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        for target, line, _, _ in imports(path):
            theirs = layer_of(target)
            if target == "avcl" or theirs is None and target in ROOT_MODULES:
                continue
            if mine is None:  # avcl/__main__.py: the command line
                continue
            if theirs is None or rank[theirs] > rank[mine]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mine} imports {target}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = {m: sorted({t for t, *_ in imports(p) if t in MODULES and t != m}) for m, p in MODULES.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _has_comment(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or on the lines right above it (through a run of imports)."""
    i = line - 1
    if "#" in lines[i]:
        return True
    while i > 0:
        i -= 1
        text = lines[i].strip()
        if text.startswith("#"):
            return True
        if not text.startswith(("import ", "from ")):
            return False
    return False


def test_imports_inside_functions_are_only_for_optional_or_slow_dependencies():
    """No avcl module is imported inside a function (that would hide a cycle); any other import there is an
    optional dependency or one slow to load, and says so in a comment."""
    hidden, silent = [], []
    for module, path in MODULES.items():
        for target, line, inside, _ in imports(path):
            if inside:
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not _has_comment(lines, node.lineno):
                    silent.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not hidden, "avcl modules imported inside functions:\n" + "\n".join(hidden)
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(set(silent)))


@pytest.mark.parametrize("source, expected", [
    ("from avcl.engine.runner import execute\n", "imports avcl.engine.runner"),
    ("def f():\n    from avcl.cli import main\n", "imports avcl.cli"),
])
def test_the_direction_check_catches_an_upward_import(tmp_path, source, expected, monkeypatch):
    """The check itself: a planted upward import in a low layer (at the top, or inside a function) is found."""
    planted = PACKAGE / "core" / "_planted_for_test.py"
    monkeypatch.setitem(MODULES, "avcl.core._planted_for_test", planted)
    original = Path.read_text

    def read_text(self, *args, **kwargs):
        return source if self == planted else original(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(AssertionError, match=expected):
        test_imports_point_down()
