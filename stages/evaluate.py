"""DVC stage `evaluate`: the trained model on the test split (stored features unless fine-tuned); paths.eval_metrics,
the confusion matrix."""

from pathlib import Path

from foodvision.core.params import load_params
from foodvision.core.stage import run
from foodvision.evaluate import evaluate


def main() -> None:
    params = load_params()
    paths = params.paths
    evaluate(Path(paths.model), Path(paths.features), device=params.device, metrics_out=Path(paths.eval_metrics),
             confusion_csv=Path(paths.confusion_csv), confusion_png=Path(paths.confusion_png))


if __name__ == "__main__":
    run(main)
