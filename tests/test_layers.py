"""The house's rules, read from the source: which wing may import which, through which door."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("vision", "service", "link", "updates")
# rooms every wing may use: they import no wing themselves (the contract is a package of them)
BASE = {"agent", "agent.config", "agent.failpoints", "agent.threads", "agent.contract"}
# what the factory may import of the agent: the contract and the wings' faces, nothing deeper
FACTORY_MAY_USE = {
    "agent",
    "agent.config",
    "agent.contract",
    "agent.vision",
    "agent.link",
    "agent.updates",
    "agent.service",
}
# the lower wings each wing may use (vision and service know nothing of link or updates;
# link knows nothing of updates)
MAY_USE = {"vision": set(), "service": set(), "link": {"vision"}, "updates": {"vision"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            if (
                node.module == "agent"
            ):  # ``from agent import targets``: the room agent.contract.targets
                found += [f"agent.{a.name}" for a in node.names if is_module(f"agent.{a.name}")]
    return found


def agent_modules() -> list[Path]:
    return sorted((ROOT / "agent").rglob("*.py"))


def factory_modules() -> list[Path]:
    return sorted((ROOT / "models").rglob("*.py"))


def in_base(name: str) -> bool:
    return name in BASE or name.startswith("agent.contract.")


def wing_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_every_wing_has_a_face_and_the_tree_has_the_four_wings():
    for wing in WINGS:
        face = ROOT / "agent" / wing / "__init__.py"
        assert face.exists(), f"agent/{wing}/ has no __init__.py naming its public face"
        assert "__all__" in face.read_text(), f"agent/{wing}/__init__.py does not name __all__"


@pytest.mark.parametrize("path", agent_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_wing_imports_only_the_base_rooms_and_the_lower_wings(path):
    name = module_name(path)
    wing = wing_of(name)
    problems = []
    for imported in imports(path):
        if imported.startswith("models"):
            problems.append(f"{imported}: the agent never imports the factory")
        if imported.split(".")[0] == "agent_demo":
            if name != "agent.cli":  # ``edge-agent demo`` starts the showcase, lazily
                problems.append(f"{imported}: the daemon never imports the showcase")
            continue
        if (not imported.startswith("agent.") and imported != "agent") or not is_module(imported):
            continue
        other = wing_of(imported)
        if wing is None:
            if in_base(name) and other is not None:
                problems.append(f"{imported}: a base room imports no wing")
            continue
        if other == wing:
            continue
        if other is None and not in_base(imported):
            problems.append(f"{imported}: a wing may import only {sorted(BASE)} at the top level")
        elif other is not None and other not in MAY_USE[wing]:
            problems.append(f"{imported}: the {wing} wing must not know the {other} wing")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", agent_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_other_rooms_enter_a_wing_through_its_face(path):
    name = module_name(path)
    deep = [
        imported
        for imported in imports(path)
        if is_module(imported)
        and (other := wing_of(imported)) is not None
        and other != wing_of(name)
        and imported != f"agent.{other}"
    ]
    assert not deep, f"{name} reaches past a wing's __init__: {deep}"


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "agent" / "contract").glob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_contract_imports_nothing_of_the_agent_but_itself(path):
    outside = [
        imported
        for imported in imports(path)
        if imported.split(".")[0] == "agent" and imported != "agent.contract"
        and not imported.startswith("agent.contract.")
    ]  # fmt: skip
    assert not outside, f"{path.name} imports {outside}: the factory could not rely on it alone"


@pytest.mark.parametrize("path", factory_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_factory_imports_only_the_contract_and_the_wings_faces(path):
    deep = [
        imported
        for imported in imports(path)
        if imported.split(".")[0] == "agent" and imported not in FACTORY_MAY_USE
    ]
    assert not deep, (
        f"{module_name(path)} reaches into the agent past its faces: {deep} "
        f"(allowed: {sorted(FACTORY_MAY_USE)}; see docs/architecture.md)"
    )


@pytest.mark.parametrize(
    "path",
    agent_modules() + factory_modules() + sorted((ROOT / "agent_demo").rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_module_opens_with_a_docstring_saying_its_job(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and docstring.splitlines()[0].strip(), f"{path} has no opening docstring"


def test_no_two_rooms_import_each_other():
    """A circle (sinks <-> annotate over FrameResult, once) means a shared thing has no room."""
    paths = agent_modules() + factory_modules() + sorted((ROOT / "agent_demo").rglob("*.py"))
    modules = {module_name(path): path for path in paths}
    graph = {name: {i for i in imports(path) if i in modules} for name, path in modules.items()}
    circles = sorted(
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if a < b and a in graph[b] and not (b.startswith(f"{a}.") or a.startswith(f"{b}."))
    )
    assert not circles, f"rooms that import each other: {circles}"


def test_the_architecture_page_states_the_rules_this_file_checks_and_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = page.split("<!-- factory-may-import", 1)[1].split("```", 2)[1]
    assert set(block.split()) == FACTORY_MAY_USE, "docs/architecture.md and FACTORY_MAY_USE differ"
    layout = page.split("## Layout", 1)[1]
    paths = agent_modules() + factory_modules() + sorted((ROOT / "agent_demo").rglob("*.py"))
    missing = [
        str(path.relative_to(ROOT))
        for path in paths
        if path.name != "__init__.py" and path.name not in layout
    ]
    assert not missing, f"docs/architecture.md's layout does not name: {missing}"
