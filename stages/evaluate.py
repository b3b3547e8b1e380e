"""DVC stage `evaluate`: metrics/eval.json and plots/eval/confusion.{csv,png}."""

from pathlib import Path

from foodvision.evaluate import evaluate
from foodvision.params import load_params
from foodvision.stage import run


def main() -> None:
    params = load_params()
    evaluate(Path("models/model.pt"), Path("data/prepared/spec.json"), device=params.train.device,
             metrics_out=Path("metrics/eval.json"), confusion_csv=Path("plots/eval/confusion.csv"),
             confusion_png=Path("plots/eval/confusion.png"))


if __name__ == "__main__":
    run(main)
