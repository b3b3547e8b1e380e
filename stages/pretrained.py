"""DVC stage `pretrained`: the backbone's weights (paths.pretrained) and their eval transform (paths.transform)."""

from pathlib import Path

from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run
from foodvision.fetch import note_untracked
from foodvision.pretrained import fetch_pretrained


def main() -> None:
    params = load_params()
    m, paths = params.model, load_paths()
    note_untracked(m.weights_url, Path(paths.inputs_weights), "model.weights_url")
    fetch_pretrained(m.name, m.weights, m.weights_url, Path(paths.pretrained), transform_out=Path(paths.transform),
                     sha256=m.sha256)


if __name__ == "__main__":
    run(main, "pretrained")
