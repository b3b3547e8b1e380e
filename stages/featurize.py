"""DVC stage `featurize`: every image through the frozen backbone once, into paths.features (+ paths.summary)."""

from pathlib import Path

from foodvision.featurize import featurize
from foodvision.params import load_params
from foodvision.stage import run


def main() -> None:
    params = load_params()
    paths = params.paths
    featurize(Path(paths.spec), Path(paths.pretrained), Path(paths.transform), Path(paths.features),
              model_name=params.model.name, batch_size=params.featurize.batch_size, device=params.train.device,
              skip_corrupt=params.data.skip_corrupt, summary_out=Path(paths.summary))


if __name__ == "__main__":
    run(main)
