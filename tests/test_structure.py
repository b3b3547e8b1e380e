"""The project's own rules that a reader relies on: dvc.yaml deps match the code each stage runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "foodvision"


def foodvision_imports(path: Path) -> set[str]:
    """Modules of the package a file imports anywhere (top level or inside a function, lazily), as paths
    under src/foodvision without .py: `model`, `core/params`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "foodvision":
            inner = node.module.split(".")[1:]
            found |= {"/".join([*inner, a.name]) if not inner or inner == ["core"] else "/".join(inner)
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {"/".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("foodvision.")}
    return found


def closure(script: Path) -> set[str]:
    """What dvc.yaml must list for a stage script: each package module it runs, and the core package once."""
    todo, seen = list(foodvision_imports(script)), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += foodvision_imports(PACKAGE / f"{name}.py")
    return {"src/foodvision/core" if name.startswith("core/") else f"src/foodvision/{name}.py" for name in seen}


def test_the_package_has_no_import_cycle():
    """Each idea has one home on its layer: no module imports, even lazily, one that imports it back."""
    graph = {str(m.relative_to(PACKAGE))[:-3]: foodvision_imports(m) for m in PACKAGE.rglob("*.py")
             if m.name != "__init__.py"}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(name):], name])}")
        if name in done or name not in graph:
            return
        for child in sorted(graph[name]):
            visit(child, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_core_package_imports_only_itself():
    """A stage lists src/foodvision/core as one dependency: that is exact only while core needs nothing else."""
    for module in sorted((PACKAGE / "core").glob("*.py")):
        outside = {m for m in foodvision_imports(module) if not m.startswith("core/")}
        assert not outside, f"{module.relative_to(ROOT)} imports {sorted(outside)}: core must stay self-contained"


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


def test_the_registry_artifacts_are_the_files_params_yaml_names():
    """DVC does not template `artifacts:`: a changed paths.model or paths.onnx must be changed there too."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    artifacts = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["foodvision-classifier"]["path"] == params["paths"]["model"]
    assert artifacts["foodvision-classifier-onnx"]["path"] == params["paths"]["onnx"]


def test_no_code_restates_a_default_of_params_yaml():
    """params.yaml is the one place a default is written: every field of the params dataclasses is required."""
    import dataclasses

    from foodvision.core import params

    classes = [c for c in vars(params).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    assert params.FinetuneParams in classes and params.PathsParams in classes
    for cls in classes:
        defaulted = [f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not defaulted, f"{cls.__name__} restates defaults for {defaulted}"
