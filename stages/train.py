"""DVC stage `train`: the head on the stored features (then, with finetune.blocks, the last blocks too); paths.model,
paths.train_metrics, paths.history, paths.curves."""

from pathlib import Path

from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run
from foodvision.train import TrainOutputs, train


def main() -> None:
    params = load_params()
    paths = load_paths()
    train(Path(paths.features), Path(paths.pretrained), Path(paths.transform), params.model, params.train,
          params.finetune, seed=params.seed, val_fraction=params.data.val_fraction, device=params.device,
          out=TrainOutputs(Path(paths.model), Path(paths.train_metrics), Path(paths.history), Path(paths.curves)))


if __name__ == "__main__":
    run(main, "train")
