"""DVC stage `export`: the trained head joined to paths.backbone_onnx as paths.onnx, checked against torch."""

from pathlib import Path

from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run
from foodvision.export import export


def main() -> None:
    load_params()  # like every stage: a bad params.yaml fails before any work
    paths = load_paths()
    export(Path(paths.model), Path(paths.features), Path(paths.backbone_onnx), Path(paths.onnx_check),
           onnx_out=Path(paths.onnx), metrics_out=Path(paths.export_check))


if __name__ == "__main__":
    run(main, "export")
