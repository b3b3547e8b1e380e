"""DVC stage `export_backbone`: the frozen backbone as ONNX (paths.backbone_onnx), checked on every test image
into paths.onnx_check; reruns only when featurize does."""

from pathlib import Path

from foodvision.core.params import load_params
from foodvision.core.stage import run
from foodvision.export_backbone import export_backbone


def main() -> None:
    params = load_params()
    paths = params.paths
    export_backbone(Path(paths.pretrained), Path(paths.transform), Path(paths.features), model_name=params.model.name,
                    onnx_out=Path(paths.backbone_onnx), check_dir=Path(paths.onnx_check))


if __name__ == "__main__":
    run(main)
