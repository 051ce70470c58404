"""The package's import graph has no cycle, counting imports inside functions too (issue #38: a
loop ``bundle -> handlers -> tracking <-> record -> bundle`` was held together by function-local
imports), and every function-local import of our own modules says why in a comment."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medseg_monai"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _targets(module: str, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """The package modules an import statement loads (a name imported from a package counts as
    that package, unless it is a submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if mods[module].name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    found = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def _graph() -> tuple[dict[str, set[str]], list[tuple[Path, int, str]]]:
    """Module -> modules it imports (anywhere but under ``if TYPE_CHECKING``), and the
    function-local imports of our own modules as (file, line, source line)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    local: list[tuple[Path, int, str]] = []
    for module, path in mods.items():
        lines = path.read_text().splitlines()
        stack: list[tuple[ast.AST, bool]] = [(ast.parse(path.read_text()), False)]
        while stack:
            node, in_function = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    targets = _targets(module, child, mods)
                    graph[module].update(targets)
                    if in_function and targets:
                        local.append((path, child.lineno, lines[child.lineno - 1]))
                function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                stack.append((child, in_function or function))
    return graph, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_hand_made_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_cycle_even_through_imports_inside_functions() -> None:
    graph, _ = _graph()
    assert graph["medseg_monai.bundle"]  # the graph was read
    assert _cycle(graph) is None


def test_every_function_local_import_of_our_modules_says_why() -> None:
    _, local = _graph()
    assert local, "none found: the scan is broken"
    unexplained = []
    for path, line, text in local:
        above = path.read_text().splitlines()[line - 2].strip()
        if "#" not in text and not above.startswith("#"):
            unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text.strip()}")
    assert not unexplained, unexplained


def test_a_single_import_reaches_every_dotted_path_the_configs_use() -> None:
    """Bundle configs (and exported bundles) import only ``medseg_monai`` and reach the rest as
    attributes: every ``medseg_monai.<path>`` a YAML file names resolves in a fresh interpreter."""
    import re
    import subprocess
    import sys

    root = PACKAGE.parent
    paths = sorted(
        {
            m.group(0)
            for f in (root / "bundles").rglob("*.yaml")
            for m in re.finditer(r"medseg_monai(\.[A-Za-z_]\w*)+", f.read_text())
        }
    )
    assert "medseg_monai.data.inputs.image_files" in paths
    code = (
        "import functools, warnings, medseg_monai\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        f"    for p in {paths!r}:\n"
        "        functools.reduce(getattr, p.split('.')[1:], medseg_monai)\n"
        "ours = [str(w.message) for w in seen if 'goes in the next release' in str(w.message)]\n"
        "assert not ours, ours  # a config names a deprecated path\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
