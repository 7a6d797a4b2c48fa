"""The library never imports the lab: imports in ``helpers`` point down one ladder, with no circle.

Every import is read from the source with ``ast`` -- module level and function bodies alike; only imports
under ``if TYPE_CHECKING:`` (annotations, never executed) are left out.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "helpers"

# The floors, bottom first. A module may import only modules on lower floors (the same floor is not allowed,
# so no two modules can lean on each other). The last three floors are the lab: the book's setting, the
# chapters' experiments and the Flower app; nothing below them may import them.
FLOORS = [
    ["reproducibility", "source", "history", "parallel", "stats", "glue"],
    ["data", "models", "error_feedback", "plots"],
    ["aggregation", "training"],
    ["quantization"],
    ["codecs.format"],
    ["codecs.quantized", "codecs.sparse"],
    ["codecs"],
    ["federated"],
    ["pruning", "distillation", "heterogeneity", "systems", "attacks", "deploy", "executorch_runtime", "privacy"],
    ["experiment"],                                          # the lab starts here
    ["chapters.ch2", "chapters.ch3", "chapters.ch4", "chapters.ch5", "chapters.ch6", "chapters.ch8", "flower.task"],
    ["chapters", "flower.client_app", "flower.server_app", "flower.launch"],
    ["flower.simulation", "flower.secagg"],
    ["flower"],
]
LAB = {"experiment", "chapters", "flower"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _is_module(name: str, root: Path) -> bool:
    where = root.joinpath(*name.split("."))
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(imported helpers module, line, inside a function?) for every import of a helpers module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    here = module_name(path, root).split(".") if module_name(path, root) else []
    package = here if path.name == "__init__.py" else here[:-1]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name.removeprefix("helpers").lstrip(".") for a in node.names
                       if a.name.split(".")[0] == "helpers"]
        else:
            if node.level:      # from . import x / from ..codecs import y
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "helpers":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:   # `from . import quantization` imports a module; `from .x import y`, x
                candidate = ".".join(base + [alias.name])
                targets.append(candidate if _is_module(candidate, root) else ".".join(base))
        found += [(t, node.lineno, id(node) in in_function) for t in targets if t]
    return found


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}
FLOOR = {name: i for i, floor in enumerate(FLOORS) for name in floor}


def test_every_module_has_a_floor():
    assert set(MODULES) - {""} == set(FLOOR), "add new modules to FLOORS (and to CONTRIBUTING.md's module map)"


@pytest.mark.parametrize("name", sorted(set(MODULES) - {""}))
def test_imports_point_down_and_never_into_the_lab(name):
    for target, line, _ in GRAPH[name]:
        assert target in FLOOR, f"helpers.{name}:{line} imports unknown helpers.{target}"
        assert FLOOR[target] < FLOOR[name], (f"helpers.{name}:{line} imports helpers.{target}, which is not on a "
                                             f"lower floor ({FLOOR[target]} >= {FLOOR[name]})")
        if name.split(".")[0] not in LAB:
            assert target.split(".")[0] not in LAB, f"library module helpers.{name}:{line} imports the lab ({target})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_helpers_import_inside_a_function(name):
    inside = [(t, line) for t, line, in_function in GRAPH[name] if in_function]
    assert not inside, f"helpers.{name or '__init__'} imports inside a function (to dodge a cycle?): {inside}"


def test_the_import_graph_has_no_circle():
    edges = {name: {t for t, _, _ in GRAPH[name]} for name in MODULES if name}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """The tests above would pass vacuously if the reader missed an import hidden in a function."""
    (tmp_path / "models.py").write_text("")
    (tmp_path / "codecs").mkdir()
    (tmp_path / "codecs" / "__init__.py").write_text("")
    (tmp_path / "codecs" / "format.py").write_text("")
    fake = tmp_path / "codecs" / "fake.py"
    fake.write_text("from typing import TYPE_CHECKING\nfrom .. import models\nfrom .format import Codec\n"
                    "if TYPE_CHECKING:\n    from ..experiment import SEEDS\n"
                    "def f():\n    import helpers.experiment\n    from ..experiment import SEEDS\n    return SEEDS\n")
    assert imports_of(fake, tmp_path) == [("models", 2, False), ("codecs.format", 3, False),
                                          ("experiment", 7, True), ("experiment", 8, True)]
