"""The shape of the code: train/ imports only downward and without cycles; functions fit on a screen."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Layers of train/, bottom first. A module may import its own group or any lower layer, never a higher one or a
# sibling group of its own layer (data and models are independent of each other).
LAYERS = [
    {"config": ["train.config"], "package": []},  # train/__init__.py, matched by name only
    {"data": ["train.data"], "models": ["train.models"]},
    {"runtime": ["train.runtime"], "mfu": ["train.mfu"], "plot": ["train.plot"]},
    {"optim": ["train.optim"], "checkpoint": ["train.checkpoint"], "step": ["train.step"],
     "decode": ["train.decode"], "metrics": ["train.metrics"], "preemption": ["train.preemption"]},
    {"pretrained": ["train.pretrained"]},
    {"loop": ["train.loop"]},
    {"cli": ["train.cli"]},
    {"sft": ["train.sft"], "generate": ["train.generate"], "main": ["train.__main__"],
     "prepare_data": ["train.prepare_data"], "plan": ["train.plan"]},  # command lines
]
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def train_modules() -> dict[str, Path]:
    """Every module of the train package (train/corpora holds data and the script that made it, not code)."""
    return {module_name(p): p for p in sorted((ROOT / "train").rglob("*.py")) if "corpora" not in p.parts}


def imports_of(path: Path, modules) -> set[str]:
    """The train modules that `path` imports anywhere in its body (a lazy import inside a function counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def place(module: str) -> tuple[int, str]:
    """(layer index, group) of a module."""
    if module == "train":
        return 0, "package"
    for rank, groups in enumerate(LAYERS):
        for group, prefixes in groups.items():
            if any(module == p or module.startswith(p + ".") for p in prefixes):
                return rank, group
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py: place it in LAYERS")


def test_train_imports_point_downward_and_form_no_cycle():
    modules = train_modules()
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    upward = []
    for m, targets in graph.items():
        (rank, group) = place(m)
        for t in targets:
            t_rank, t_group = place(t)
            if t_group != group and t_rank >= rank:
                upward.append(f"{m} (layer {rank}) imports {t} (layer {t_rank})")
    assert not upward, "\n".join(upward)
    state, stack = {}, []

    def visit(m):  # depth-first search; meeting a module still on the stack closes a cycle
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            assert state.get(t) != "open", "import cycle: " + " -> ".join(stack[stack.index(t):] + [t])
            if t not in state:
                visit(t)
        state[m] = "done"
        stack.pop()

    for m in graph:
        if m not in state:
            visit(m)


def test_every_train_module_imports_in_a_fresh_interpreter():
    order = sorted(train_modules(), key=lambda m: -place(m)[0])  # top layer first: each pulls in its own deps
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\nprint('ok')" % order
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_functions_fit_on_a_screen():
    long = []
    for path in [*(ROOT / "train").rglob("*.py"), *(ROOT / "muon_jax").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body:
                    lines = body[-1].end_lineno - body[0].lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)
