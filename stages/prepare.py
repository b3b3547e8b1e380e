"""DVC stage `prepare`: validate the images and write data/prepared/spec.json."""

from pathlib import Path

from foodvision.params import load_params
from foodvision.prepare import prepare
from foodvision.stage import run


def main() -> None:
    params = load_params()
    prepare(Path("data/raw/pizza_steak_sushi"), Path("data/prepared/spec.json"),
            transform_path=Path("models/pretrained/transform.json"),
            batch_size=params.train.batch_size, seed=params.seed, skip_corrupt=params.data.skip_corrupt)


if __name__ == "__main__":
    run(main)
