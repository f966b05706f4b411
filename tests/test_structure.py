"""The package's structure as docs/architecture.md states it: no import cycles between justrl's
modules (imports inside functions included), the layers (the recipe's math, rewards and data know
nothing of engines, clusters or learners); read with `ast`."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "justrl"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + [node.module]) if node.module else ".".join(base)
                candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for name in candidates:
                if name in modules and name != module:  # the most specific module that exists
                    graph[module].add(name)
                    break
    return graph


def cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "justrl.trainer" in graph and "justrl.cluster.placement" in graph["justrl.cluster.slurm"]  # the graph is read
    assert cycle_from(graph) is None, " -> ".join(cycle_from(graph))


def test_a_cycle_is_found():
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# The lower layers and what they may not import (the package's own rule; docs/architecture.md).
LOWER_LAYERS = ("justrl.grpo", "justrl.reward", "justrl.data")
UPPER_LAYERS = ("justrl.rollout", "justrl.cluster", "justrl.learner", "justrl.weight_sync", "justrl.trainer",
                "justrl.controller", "justrl.launch")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    def within(module, packages):
        return any(module == p or module.startswith(p + ".") for p in packages)

    return sorted(f"{m} -> {t}" for m, targets in graph.items() if within(m, LOWER_LAYERS)
                  for t in targets if within(t, UPPER_LAYERS))


def test_math_rewards_and_data_import_nothing_from_engines_clusters_or_learners():
    graph = import_graph()
    assert "justrl.reward.dapo" in graph["justrl.data.benchmarks"]  # lower layers are read too
    assert layer_violations(graph) == []
    assert layer_violations({"justrl.data.x": {"justrl.rollout.fleet"}}) == ["justrl.data.x -> justrl.rollout.fleet"]



MAX_MODULE_LINES = 400


def test_no_module_is_over_400_lines():
    """A module a reader takes in one sitting (the bar docs/architecture.md sets): none of
    justrl's is over MAX_MODULE_LINES lines."""
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 60  # the whole package was read
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}
