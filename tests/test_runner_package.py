"""The runner's package (``dragrun/``) stays out of what ComfyUI loads: the pack imports neither it nor ``tools/``."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    """The top-level names of the absolute imports in a Python file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_pack_imports_neither_the_runner_nor_the_tools():
    loaded = [ROOT / "__init__.py", *sorted((ROOT / "nodes").rglob("*.py")), *sorted((ROOT / "dragkit").rglob("*.py"))]
    assert len(loaded) > 10
    offending = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & {"dragrun", "tools"}) for p in loaded}
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_check_sees_an_import_of_the_runner(tmp_path):
    """Positive control: the parser finds both import forms."""
    (tmp_path / "m.py").write_text("import dragrun.run_workflow\nfrom tools.tiny_models import cache_dir\nfrom . import x\n")
    assert imported_packages(tmp_path / "m.py") == {"dragrun", "tools"}
