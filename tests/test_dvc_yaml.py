"""dvc.yaml declares, for every stage, the code it runs: its script and every project module it imports.

Stages share code through stages/lib only: no file in stages/ imports a stage, and tools/ and
benchmarks/ import stages/lib, never a stage script.
"""

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
STAGES = REPO_ROOT / "stages"
LIB = STAGES / "lib"
PACKAGE_MARKER = STAGES / "__init__.py"  # empty: importing the package runs no code


def relative(paths) -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for p in paths)


def module_file(name: str) -> Path | None:
    """The file of project module `name` (`stages.lib.io`); None for a name that is no module of stages/."""
    if name != "stages" and not name.startswith("stages."):
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def imported_names(tree: ast.AST, package: tuple[str, ...]) -> list[str]:
    """Every module name the import statements of `tree` (a module of `package`) may load."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:
                module = ".".join([*package[:len(package) - node.level + 1], *([module] if module else [])])
            # `from stages import sft` and `from stages.lib import io` load the modules they name.
            names += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return names


def module_files(names: list[str]) -> set[Path]:
    files = {module_file(name) for name in names} - {None, PACKAGE_MARKER}
    if any(f.is_relative_to(LIB) for f in files):
        files.add(LIB / "__init__.py")  # importing stages.lib.<x> runs the package's __init__ first
    return files


def direct_imports(path: Path) -> set[Path]:
    """Project modules `path` imports itself."""
    return module_files(imported_names(ast.parse(path.read_text()), path.relative_to(REPO_ROOT).parent.parts))


def all_imports(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """Project modules `path` imports, directly or through the modules it imports."""
    seen = set() if seen is None else seen
    for module in direct_imports(path) - seen - {path}:
        seen.add(module)
        all_imports(module, seen)
    return seen


def is_stage_script(path: Path) -> bool:
    return path.parent == STAGES and path != PACKAGE_MARKER


def stage_definitions():
    for name, stage in DVC_YAML["stages"].items():
        yield name, stage.get("do", stage)


@pytest.mark.parametrize("name, stage", list(stage_definitions()), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_cover_the_code_it_runs(name, stage):
    script = STAGES / f"{name}.py"
    deps = {REPO_ROOT / d for d in stage["deps"] if "$" not in d}
    assert script in deps
    code = all_imports(script)
    missing = relative(p for p in code if p not in deps)
    assert not missing, f"{name} imports {missing} but dvc.yaml does not list them as deps"
    if LIB / "chat.py" in code:
        assert LIB / "templates" in deps  # chat.py reads the training template from there
    # Exactly: code the stage does not run would re-run it for nothing when it changes.
    extra = relative(d for d in deps if d.is_relative_to(STAGES) and d.suffix == ".py" and d not in code | {script})
    assert not extra, f"{name} lists {extra} as deps but does not import them"


@pytest.mark.parametrize("path", sorted(STAGES.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_stage_code_imports_a_stage(path):
    stages = relative(p for p in direct_imports(path) if is_stage_script(p) and p != path)
    assert not stages, f"{path.relative_to(REPO_ROOT)} imports {stages}: code stages share belongs in stages/lib"


TOOLS_AND_BENCHMARKS = sorted(p for folder in ("tools", "benchmarks") for p in (REPO_ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", TOOLS_AND_BENCHMARKS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_tools_and_benchmarks_import_only_stages_lib(path):
    outside = relative(p for p in direct_imports(path) if not p.is_relative_to(LIB))
    assert not outside, f"{path.relative_to(REPO_ROOT)} imports {outside}; it may import stages/lib only " \
                        f"(or run a stage as `python -m stages.<name>`)"


def test_every_import_form_is_seen():
    lines = ["import stages.sft", "from stages import dpo, lib", "from stages.rl import main",
             "from stages.lib import io", "from stages.lib.chat import CHATML_TEMPLATE", "from . import policy",
             "from .errors import StageError", "import os", "from pathlib import Path",
             "def later():", "    from stages import token_analysis"]

    def imports_of(text):
        return set(relative(module_files(imported_names(ast.parse(text), ("stages", "lib")))))

    assert imports_of("\n".join(lines)) == {
        "stages/sft.py", "stages/dpo.py", "stages/rl.py", "stages/token_analysis.py", "stages/lib/__init__.py",
        "stages/lib/io.py", "stages/lib/chat.py", "stages/lib/policy.py", "stages/lib/errors.py"}
    assert imports_of("import json\nfrom stages import lib\n") == {"stages/lib/__init__.py"}
