"""The package's import graph: dependencies point one way (no circle through module-level imports)
and an import inside a function says why it is there (an optional or heavy dependency loaded on
first use), so that the real graph is the one the file headers show."""
import ast
import os

import pgl_fast

PKG = os.path.dirname(pgl_fast.__file__)


def _modules() -> dict[str, str]:
    """module name -> file, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [target] + [f"{target}.{a.name}" for a in node.names]
    return names


def _top_level_edges(mods: dict[str, str]) -> dict[str, set[str]]:
    edges = {}
    for name, path in mods.items():
        tree = ast.parse(open(path).read())
        deps = set()
        for node in tree.body:  # module level only: function-level imports run later, on use
            if isinstance(node, ast.ImportFrom):
                for t in _resolve(name, path.endswith("__init__.py"), node):
                    if t in mods and t != name:
                        deps.add(t)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods and a.name != name}
        edges[name] = deps
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            # a package's __init__ importing its own submodules is how a package exports them
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle_between_the_packages_modules():
    cycle = _cycle(_top_level_edges(_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_inside_a_function_says_why():
    missing = []
    for name, path in sorted(_modules().items()):
        lines = open(path).read().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in line and not above.startswith("#"):
                        missing.append(f"{os.path.relpath(path, PKG)}:{node.lineno} in {fn.name}(): {line.strip()}")
    assert not missing, "imports inside functions without a reason:\n" + "\n".join(missing)
