"""DVC stage `predict`: the exported model (paths.onnx) on test images and your photos; paths.predictions(_json),
and the test photos as paths.examples."""

from pathlib import Path

from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run
from foodvision.fetch import note_untracked
from foodvision.predict import predict


def main() -> None:
    params = load_params()
    paths = load_paths()
    for image in params.predict.images:
        note_untracked(image, Path(paths.inputs_images), "predict.images entry")
    predict(Path(paths.onnx), Path(paths.features), num_samples=params.predict.num_samples,
            images=params.predict.images, seed=params.seed,
            out_dir=Path(paths.predictions), json_out=Path(paths.predictions_json), photos_dir=Path(paths.examples))


if __name__ == "__main__":
    run(main, "predict")
