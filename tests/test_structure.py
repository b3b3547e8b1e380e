"""The project's own rules that a reader relies on: dvc.yaml deps match the code each stage runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "foodvision"


def foodvision_imports(path: Path) -> set[str]:
    """Modules of the package a file imports anywhere (top level or inside a function, lazily)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "foodvision":
            if node.module == "foodvision":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("foodvision.")}
    return found


def closure(script: Path) -> set[str]:
    todo, seen = list(foodvision_imports(script)), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += foodvision_imports(PACKAGE / f"{name}.py")
    return {f"src/foodvision/{name}.py" for name in seen}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_module_its_script_runs(stage):
    script = ROOT / "stages" / f"{stage}.py"
    assert STAGES[stage]["cmd"] == f"python stages/{stage}.py"
    deps = {d if isinstance(d, str) else next(iter(d)) for d in STAGES[stage]["deps"]}
    assert f"stages/{stage}.py" in deps
    missing = closure(script) - deps
    assert not missing, f"dvc.yaml stage {stage!r} misses deps {sorted(missing)}: editing them would rerun nothing"
    extra = {d for d in deps if d.startswith("src/")} - closure(script)
    assert not extra, f"dvc.yaml stage {stage!r} lists {sorted(extra)}, which it does not import"


def test_every_output_path_is_written_once_in_params():
    """dvc.yaml names no output path literally: each comes from `paths:` in params.yaml."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in STAGES.items():
        for section in ("outs", "metrics"):
            for out in stage.get(section, []):
                path = out if isinstance(out, str) else next(iter(out))
                assert path.startswith("${paths.") and path[8:-1] in params["paths"], (name, path)


def test_the_lock_pins_every_dependency_with_hashes():
    """The README's setup installs from requirements.lock: exact versions, sha256 for each, torch as pinned."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    lock = (ROOT / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, flags=re.M))
    normal = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[]", requirement)[0]).lower()
        assert name in normal, f"{name} is not pinned in requirements.lock"
    assert normal["torch"] == "2.14.1" and normal["torchvision"] == "0.29.1"
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.split("\n\n", 1)[1] if "\n\n" in lock else lock)
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
