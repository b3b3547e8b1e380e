"""DVC stage `train`: models/model.pt, models/summary.txt, metrics/train.json, plots/train/*."""

from pathlib import Path

from foodvision.params import load_params
from foodvision.stage import run
from foodvision.train import train


def main() -> None:
    params = load_params()
    train(Path("data/prepared/spec.json"), Path("models/pretrained/backbone.pth"), params.model, params.train,
          seed=params.seed, model_out=Path("models/model.pt"), summary_out=Path("models/summary.txt"),
          metrics_out=Path("metrics/train.json"), history_out=Path("plots/train/history.csv"),
          curves_out=Path("plots/train/loss_curves.png"))


if __name__ == "__main__":
    run(main)
