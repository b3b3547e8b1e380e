"""DVC stage `predict`: plots/predictions/*.png and plots/predictions.json."""

from pathlib import Path

from foodvision.params import load_params
from foodvision.predict import predict
from foodvision.stage import run


def main() -> None:
    params = load_params()
    predict(Path("models/model.pt"), Path("data/prepared/spec.json"), num_samples=params.predict.num_samples,
            images=params.predict.images, seed=params.seed, device=params.train.device,
            out_dir=Path("plots/predictions"), json_out=Path("plots/predictions.json"))


if __name__ == "__main__":
    run(main)
