"""The project's own rules that a reader relies on: no import cycles, a thin script per stage, paths written once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from foodvision.core.params import PathsParams, load_paths

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
    """core is the bottom layer (params, errors, files, devices): everything may use it, it uses nothing."""
    for module in sorted((PACKAGE / "core").glob("*.py")):
        outside = {m for m in foodvision_imports(module) if not m.startswith("core/")}
        assert not outside, f"{module.relative_to(ROOT)} imports {sorted(outside)}: core must stay self-contained"


PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = PIPELINE["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_reruns_on_any_code_change(stage):
    """Two code dependencies, not one per module (45 columns of `dvc exp show`): the library and the scripts."""
    assert STAGES[stage]["cmd"] == f"python stages/{stage}.py"
    assert (ROOT / "stages" / f"{stage}.py").is_file()
    deps = {d if isinstance(d, str) else next(iter(d)) for d in STAGES[stage]["deps"]}
    assert {"src/foodvision", "stages"} <= deps
    assert not {d for d in deps if d.startswith(("src/", "stages/"))} - {"src/foodvision"}


@pytest.mark.parametrize("stage", sorted(s for s in STAGES if STAGES[s].get("outs")))
def test_every_stage_with_outputs_moves_them_together(stage):
    """`run(main, "<stage>")` restores the stage's dvc.yaml outs when it fails; `run(main)` would not."""
    assert f'run(main, "{stage}")' in (ROOT / "stages" / f"{stage}.py").read_text()


PATHS = {k: v for item in PIPELINE["vars"] if "paths" in item for k, v in item["paths"].items()}


def test_every_output_path_is_written_once_in_the_vars():
    """dvc.yaml names no output path literally: each comes from `paths:` in its `vars:`."""
    for name, stage in STAGES.items():
        for out in stage.get("outs", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path.startswith("${paths.") and path[8:-1] in PATHS, (name, path)
    assert load_paths(ROOT / "dvc.yaml") == PathsParams(**PATHS)
    assert "paths" not in yaml.safe_load((ROOT / "params.yaml").read_text()), "paths are not experiment parameters"


def test_the_registry_artifacts_are_the_files_the_vars_name():
    """DVC does not template `artifacts:`: a changed paths.model or paths.onnx must be changed there too."""
    artifacts = PIPELINE["artifacts"]
    assert artifacts["foodvision-classifier"]["path"] == PATHS["model"]
    assert artifacts["foodvision-classifier-onnx"]["path"] == PATHS["onnx"]


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
