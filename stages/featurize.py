"""DVC stage `featurize`: every image through the frozen backbone once, into paths.features (+ paths.summary).

With featurize.processes > 1 it re-runs itself under torchrun, one rank per process.
"""

import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from foodvision import distributed
from foodvision.featurize import featurize
from foodvision.params import load_params
from foodvision.stage import run


@record  # under torchrun: a failing rank leaves its error where the launcher reads it
def main() -> None:
    params = load_params()
    if params.featurize.processes > 1 and not distributed.under_torchrun():
        sys.exit(distributed.launch(Path(__file__), params.featurize.processes))
    paths = params.paths
    featurize(Path(paths.spec), Path(paths.pretrained), Path(paths.transform), Path(paths.features),
              model_name=params.model.name, batch_size=params.featurize.batch_size, device=params.train.device,
              skip_corrupt=params.data.skip_corrupt, summary_out=Path(paths.summary),
              precision=params.featurize.precision)


if __name__ == "__main__":
    run(main)
