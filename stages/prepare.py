"""DVC stage `prepare`: find the dataset's layout and classes, check the images, write paths.spec."""

from pathlib import Path

from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run
from foodvision.prepare import prepare


def main() -> None:
    params, paths = load_params(), load_paths()
    d = params.data
    prepare(Path(paths.raw), Path(paths.spec), classes=d.classes, test_fraction=d.test_fraction,
            seed=params.seed, skip_corrupt=d.skip_corrupt)


if __name__ == "__main__":
    run(main, "prepare")
