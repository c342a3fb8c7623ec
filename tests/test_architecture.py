"""The package's shape, read from source with `ast`: no import cycles (lazy imports inside
functions included), and no code outside tunesmith/tasks/ that branches on a task's name."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tunesmith"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """tunesmith modules that `name` imports anywhere in its source (top level, functions, branches).
    `from pkg import x` counts as importing pkg.x when x is a module, else pkg itself."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import tunesmith.data.formats as f` -> that module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
            # Importing pkg.sub runs pkg/__init__ first: from outside pkg, that is an import of pkg too.
            parent = t.rpartition(".")[0]
            while parent and parent != "tunesmith" and not (name == parent or name.startswith(parent + ".")):
                out.add(parent)
                parent = parent.rpartition(".")[0]
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "tunesmith.config" in graph["tunesmith.train"]
    # tunesmith/__init__.py imports the heavy entry points inside __getattr__ only
    assert {"tunesmith.train", "tunesmith.runs"} <= graph["tunesmith"]


def test_a_submodule_import_counts_its_package():
    """`from tunesmith.train import checkpoint` runs tunesmith/train/__init__.py first: a module
    outside tunesmith.train that does this depends on the whole package (the cycle
    train -> online loop -> train.checkpoint -> train once went unseen this way)."""
    graph = import_graph()
    users = [m for m, deps in graph.items() if "tunesmith.train.runtime" in deps and not m.startswith("tunesmith.train")]
    assert users, "expected some module outside tunesmith.train to import tunesmith.train.runtime"
    assert all("tunesmith.train" in graph[m] for m in users)
    # inside the package, a sibling import is not an import of the package's own __init__
    assert "tunesmith.train" not in graph["tunesmith.train.loop"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---------------------------------------------------------------- the core asks the task
_ISSUE_PATTERN = re.compile(r"task (==|in|!=)|\.task (==|in|!=)|PREF_TASKS|ONLINE_TASKS|NEEDS_REFERENCE|HEAD_TASKS")


def _task_name_uses(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """Branches on a task's name: a comparison (==, !=, in, match) of something about a task with a
    name, a comparison with a collection of two or more names, a dict keyed by two or more names.
    ("classification" is also a format and "reward" a metric: those comparisons do not mention a task.)"""

    def literal_names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and node.value in names:
            return [node.value]
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            return [n for e in node.elts for n in literal_names(e)]
        if isinstance(node, ast.Call) and node.args:  # frozenset({...}), set((...))
            return literal_names(node.args[0])
        return []

    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            found = [n for side in sides for n in literal_names(side)]
            about_task = any("task" in ast.unparse(side).lower() for side in sides if not literal_names(side))
            if found and (about_task or len(set(found)) > 1):
                hits.append((node.lineno, f"compares with task name(s) {sorted(set(found))}"))
        elif isinstance(node, ast.Match) and "task" in ast.unparse(node.subject).lower():
            hits.append((node.lineno, "matches on a task"))
        elif isinstance(node, ast.Dict):
            keyed = {n for k in node.keys if k is not None for n in literal_names(k)}
            if len(keyed) > 1:
                hits.append((node.lineno, f"a dict keyed by task names {sorted(keyed)}"))
    return hits


def test_the_task_name_finder_finds_branches():
    src = ('if cfg.task == "dpo": pass\nx = t in ("ppo", "grpo")\nd = {"sft": 1, "dpo": 2}\nok = f("sft")\n'
           'fine = fmt == "sft"\nalso = task_name != "sft"\n')
    assert [line for line, _ in _task_name_uses(ast.parse(src), {"dpo", "ppo", "grpo", "sft"})] == [1, 2, 3, 6]


def test_no_code_outside_the_tasks_branches_on_a_task_name():
    from tunesmith.tasks import task_names

    names = set(task_names())
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if (PKG / "tasks") in path.parents:
            continue
        text = path.read_text()
        rel = path.relative_to(PKG.parent)
        found += [f"{rel}:{line}: {what}" for line, what in _task_name_uses(ast.parse(text), names)]
        found += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                  if _ISSUE_PATTERN.search(line)]
    assert not found, "ask tunesmith.tasks.get_task(name) instead:\n" + "\n".join(found)
