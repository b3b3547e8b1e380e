"""DVC stage `pretrained`: the backbone's weights, models/pretrained/backbone.pth, and its transform.json."""

from pathlib import Path

from foodvision.params import load_params
from foodvision.pretrained import fetch_pretrained
from foodvision.stage import run


def main() -> None:
    params = load_params()
    m = params.model
    fetch_pretrained(m.name, m.weights, m.weights_url, Path("models/pretrained/backbone.pth"),
                     transform_out=Path("models/pretrained/transform.json"))


if __name__ == "__main__":
    run(main)
