"""DVC stage `train`: the head on the stored features (then, with finetune.blocks, the last blocks too); paths.model,
paths.train_metrics, paths.history, paths.curves."""

from pathlib import Path

from foodvision.core.params import load_params
from foodvision.core.stage import run
from foodvision.train import train


def main() -> None:
    params = load_params()
    paths = params.paths
    train(Path(paths.features), Path(paths.pretrained), Path(paths.transform), params.model, params.train,
          params.finetune, seed=params.seed, val_fraction=params.data.val_fraction, device=params.device,
          model_out=Path(paths.model),
          metrics_out=Path(paths.train_metrics), history_out=Path(paths.history), curves_out=Path(paths.curves))


if __name__ == "__main__":
    run(main)
