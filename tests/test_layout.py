"""The layout a reader relies on: one package per concern, imports that run one way only (the order
the README's layout section states), no import circle, no repo import hidden in a function, and
util/ holding only the MAE reference's module names."""
import ast
import os

from conftest import REPO

# top to bottom: a module imports its own layer and the layers below it, never one above
LAYERS = [
    ("entry points", ("main_", "engine_", "benchmark", "submitit_", "hubconf", "tools", "perf")),
    ("evals", ("evals",)),
    ("segmenter", ("segmenter",)),
    ("models", ("models_mae", "models_vit")),
    ("mask methods", ("mask_methods",)),
    ("inputs", ("inputs",)),
    ("sam", ("sam",)),
    ("run", ("run",)),
    ("util", ("util",)),
]
REFERENCE_UTIL = {"__init__", "misc", "lr_sched", "lr_decay", "lars", "pos_embed", "crop", "datasets"}
SKIP = {".venv", ".git", "tests", "data", "notebooks"}


def repo_modules() -> dict[str, str]:
    found = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith((".", "output"))]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(top == p or (p.endswith("_") and top.startswith(p)) for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer of the README's order")


def imports(path: str, modules: set[str]) -> list[tuple[str, bool, int]]:
    """(imported repo module, inside a function, line) for every import statement of the file."""
    tree = ast.parse(open(path).read())
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules else child.module
                         for a in child.names]
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    out.append((name, in_function, child.lineno))
    visit(tree, False)
    return out


def test_every_module_imports_downward_only_and_never_inside_a_function():
    modules = repo_modules()
    problems = []
    for module, path in modules.items():
        for target, in_function, line in imports(path, set(modules)):
            if in_function:
                problems.append(f"{module}:{line} imports {target} inside a function")
            if layer_of(target) < layer_of(module):
                problems.append(f"{module}:{line} imports {target} from a layer above ({LAYERS[layer_of(target)][0]})")
    assert not problems, "\n".join(problems)


def test_there_is_no_import_circle():
    modules = repo_modules()
    graph = {m: {t for t, _, _ in imports(p, set(modules)) if t != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_util_holds_only_the_reference_modules():
    names = {n[:-3] for n in os.listdir(os.path.join(REPO, "util")) if n.endswith(".py")}
    assert names <= REFERENCE_UTIL, sorted(names - REFERENCE_UTIL)
    assert not [d for d in os.listdir(os.path.join(REPO, "util")) if os.path.isdir(os.path.join(REPO, "util", d))
                and d != "__pycache__"]
