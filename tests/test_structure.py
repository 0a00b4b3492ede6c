"""Rules the code keeps: no import cycles between the project's modules (lazy imports inside functions count:
they hide a cycle from the interpreter, not from a reader), and no module using another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_sources() -> dict[str, str]:
    """Module name -> source: the library, pipelines/, components/ and the local stack (infra/local)."""
    found = {}
    roots = ((ROOT / "src", "sermtl"), (ROOT, "pipelines"), (ROOT, "components"))
    for base, top in (*roots, (ROOT / "infra/local/src", "sermtl_localstack")):
        for path in sorted((base / top).rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def dependencies(sources: dict[str, str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Each module's imports of other project modules (-> first line), and every use of another module's
    private name ("module:line uses other._name")."""
    graph: dict[str, dict[str, int]] = {}
    private: list[str] = []
    for name, source in sources.items():
        tree = ast.parse(source)
        imports: dict[str, int] = {}
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in sources:  # `from sermtl import tracking`: the module itself
                        imports.setdefault(full, node.lineno)
                        aliases[alias.asname or alias.name] = full
                    elif node.module in sources:
                        imports.setdefault(node.module, node.lineno)
                        if is_private(alias.name) and node.module != name:
                            private.append(f"{name}:{node.lineno} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in sources:
                        imports.setdefault(alias.name, node.lineno)
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and is_private(node.attr)
            ):
                private.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
        imports.pop(name, None)
        graph[name] = imports
    return graph, private


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    edges = [f"{a} -> {b} (line {line})" for a in component for b, line in graph[a].items() if b in component]
    return "; ".join(edges)


def test_no_import_cycles():
    graph, _ = dependencies(project_sources())
    assert len(graph) > 30  # the library, pipelines/ and components/ were all read
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(graph, c) for c in found)


def test_no_module_uses_another_modules_private_names():
    _, private = dependencies(project_sources())
    assert not private, "private names used across modules (make them public or move the code): " + "; ".join(
        private
    )


def test_the_checks_see_lazy_cycles_and_private_uses():
    """Both rules fail on code that breaks them, a cycle closed by an import inside a function included."""
    sources = {
        "sermtl.a": "from sermtl.b import thing\n",
        "sermtl.b": "def thing():\n    from sermtl import c\n    return c._hidden()\n",
        "sermtl.c": "import sermtl.a\n\ndef _hidden():\n    return 1\n",
        "sermtl.d": "from sermtl.c import _hidden\n",
    }
    graph, private = dependencies(sources)
    assert cycles(graph) == [["sermtl.a", "sermtl.b", "sermtl.c"]]
    assert private == ["sermtl.b:3 uses sermtl.c._hidden", "sermtl.d:1 imports sermtl.c._hidden"]


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_DOCSTRING_LINES = 8
LONG = "# long:"  # the reason written beside a module or function that is longer


def oversized(name: str, source: str) -> list[str]:
    """What breaks the size rules in one module: over MAX_MODULE_LINES without `# long: <reason>` in its first
    lines, a function over MAX_FUNCTION_LINES without it on the line above the `def` (or its decorators), a
    module docstring over MAX_DOCSTRING_LINES (design notes belong in docs/)."""
    lines = source.splitlines()
    found = []
    if len(lines) > MAX_MODULE_LINES and not any(line.startswith(LONG) for line in lines[:15]):
        found.append(f"{name}: {len(lines)} lines")
    tree = ast.parse(source)
    docstring = ast.get_docstring(tree, clean=False) or ""
    if len(docstring.splitlines()) > MAX_DOCSTRING_LINES:
        found.append(f"{name}: module docstring of {len(docstring.splitlines())} lines")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = lines[first - 2].strip() if first >= 2 else ""
            if length > MAX_FUNCTION_LINES and not above.startswith(LONG):
                found.append(f"{name}:{node.lineno} {node.name}() of {length} lines")
    return found


def test_modules_and_functions_stay_short_or_say_why():
    found = [problem for name, source in project_sources().items() for problem in oversized(name, source)]
    assert not found, "too long without a `# long: <reason>` beside it: " + "; ".join(found)


def test_the_size_check_sees_long_modules_functions_and_docstrings():
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES))
    long_function = f"def f():\n{body}\n"
    assert oversized("m", long_function) == ["m:1 f() of 81 lines"]
    assert oversized("m", f"{LONG} a table of cases\n{long_function}") == []
    assert oversized("m", "x = 1\n" * (MAX_MODULE_LINES + 1)) == [f"m: {MAX_MODULE_LINES + 1} lines"]
    docstring = '"""' + "\n" * MAX_DOCSTRING_LINES + 'end"""\n'
    assert oversized("m", docstring) == [f"m: module docstring of {MAX_DOCSTRING_LINES + 1} lines"]
