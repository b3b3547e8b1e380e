"""DVC stage `evaluate`: the trained model on the test split (stored features unless fine-tuned); paths.eval_metrics,
the per-class table, the confusion matrix, the hardest test images."""

from pathlib import Path

from foodvision.audit import leaked_test_images
from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run
from foodvision.evaluate import evaluate


def main() -> None:
    params = load_params()
    paths = load_paths()
    evaluate(Path(paths.model), Path(paths.features), device=params.device, metrics_out=Path(paths.eval_metrics),
             per_class_csv=Path(paths.per_class), confusion_csv=Path(paths.confusion_csv),
             confusion_png=Path(paths.confusion_png), hardest_png=Path(paths.hardest),
             leaked=frozenset(leaked_test_images(Path(paths.audit_issues))))


if __name__ == "__main__":
    run(main, "evaluate")
