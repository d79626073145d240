"""The packages' layers: imports go one way (DESIGN.md, "Packages and layers"), with no cycle.

Every import statement counts, also one inside a function: a function-local import is still a
dependency, it only hides it from a reader.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("foundation", "trainables", "search_spaces", "analysis", "study")
#: What each package may import of the project; the README's code map draws the same layers.
ALLOWED = {
    "foundation": set(),
    "trainables": {"foundation"},
    "search_spaces": {"foundation"},
    "analysis": {"foundation"},
    "study": {"foundation", "trainables", "search_spaces", "analysis"},
}


def imports_between_packages() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the 'file:line' of every such import."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in PACKAGES and top != package:
                        edges.setdefault((package, top), []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return edges


def test_every_import_between_packages_goes_down_the_layers():
    edges = imports_between_packages()
    wrong = {edge: where for edge, where in edges.items() if edge[1] not in ALLOWED[edge[0]]}
    assert not wrong, "imports against the layers: " + "; ".join(
        f"{a} -> {b} at {', '.join(where)}" for (a, b), where in wrong.items())
    assert ("study", "trainables") in edges and ("trainables", "foundation") in edges  # the walk sees imports


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for importer, imported in imports_between_packages():
        graph[importer].add(imported)
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for package in PACKAGES:
        if package not in state:
            visit(package, [])


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walk and the check above catch a function-local import that closes a cycle."""
    for package, body in (("foundation", "def f():\n    from study import run\n"), ("study", "import foundation\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "m.py").write_text(body)
    for package in PACKAGES[1:4]:
        (tmp_path / package).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges = imports_between_packages()
    assert edges == {("foundation", "study"): ["foundation/m.py:2"], ("study", "foundation"): ["study/m.py:1"]}
    with pytest.raises(pytest.fail.Exception, match="import cycle: foundation -> study -> foundation"):
        test_the_package_graph_has_no_cycle()
