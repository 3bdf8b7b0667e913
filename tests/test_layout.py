"""The package's folders are its parts, and no import runs back up (a lower floor never imports a higher one)."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnet_fastai"
# the floors, lowest first: the torch-free helpers and `speed` at the top level, then the subpackages
FLOORS = {"": 0, "nn": 1, "data": 2, "runs": 3, "analysis": 4, "sweeps": 5, "app": 6}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnet_fastai"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bnet_fastai")}
    return found


def _floor(dotted: str) -> int:
    parts = dotted.split(".")[1:]
    return FLOORS[parts[0]] if parts and parts[0] in FLOORS else 0


def test_no_module_imports_a_higher_floor():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 and path.name in ("__init__.py", "__main__.py"):
            continue  # the public names (imported lazily) and `python -m bnet_fastai`
        own = FLOORS[parts[0]] if len(parts) > 1 else 0
        upward += [f"{path.relative_to(PACKAGE)} imports {name}" for name in sorted(_imports(path))
                   if _floor(name) > own]
    assert upward == []


def test_the_top_level_holds_at_most_a_dozen_modules_and_the_parts_are_subpackages():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 12, modules
    parts = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert parts == sorted(f for f in FLOORS if f)
    assert all((PACKAGE / part / "__init__.py").read_text().startswith('"""') for part in parts)  # each says what it holds


def test_python_m_bnet_fastai_is_the_command_and_answers_without_torch(tmp_path):
    code = ("import runpy, sys\nsys.argv = ['bnet-fastai', '--version']\ntry:\n    runpy.run_module('bnet_fastai', "
            "run_name='__main__')\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.splitlines() == ["bnet-fastai 0.1.0", "0 False"]
