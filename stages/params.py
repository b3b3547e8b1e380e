"""DVC stage `params`: params.yaml validated whole whenever it changed, even where no other stage reruns.

Every stage validates the whole file before its work, but only a stage that reruns does: a misspelled
key added beside the right one (`epoch: 10` under `train:`) changes no stage's params and would pass
silently. This stage depends on the whole file and writes nothing, so any edit of params.yaml (or a
`dvc exp run -S`) reruns it, and a bad key fails the run in one line naming it.
"""

from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run


def main() -> None:
    load_params()
    load_paths()
    print("params.yaml: every key known, every value valid; dvc.yaml: every path valid")


if __name__ == "__main__":
    run(main)
