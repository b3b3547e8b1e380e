"""DVC stage `featurize`: every image through the frozen backbone once, into paths.features (+ paths.summary),
then the backbone as ONNX (paths.backbone_onnx), checked on every test image into paths.onnx_check; rows are
kept by image content in featurize.cache_dir, so a data change computes only what changed (paths.feature_rows
says how many).

With featurize.processes > 1 it re-runs itself under torchrun, one rank per process; this launching
process never imports torch (its 3 s would add to every run).
"""

import sys
from pathlib import Path

from foodvision import distributed
from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run, under_torchrun


def main() -> None:
    params = load_params()
    if params.featurize.processes > 1 and not under_torchrun():
        sys.exit(distributed.launch(Path(__file__), params.featurize.processes))
    if under_torchrun():
        distributed.die_with_parent()  # a rank: down with torchrun, not an orphan
    from torch.distributed.elastic.multiprocessing.errors import record  # a failing rank's error, for the launcher

    from foodvision.feature_cache import default_dir
    from foodvision.featurize import Cache, featurize

    paths, f = load_paths(), params.featurize
    cache = (Cache(Path(f.cache_dir).expanduser() if f.cache_dir else default_dir(), int(f.cache_gb * 2**30))
             if f.cache_gb > 0 else None)
    record(featurize)(Path(paths.spec), Path(paths.pretrained), Path(paths.transform), Path(paths.features),
                      model_name=params.model.name, batch_size=f.batch_size, device=params.device,
                      skip_corrupt=params.data.skip_corrupt, summary_out=Path(paths.summary),
                      precision=f.precision, engine=f.engine, onnx_out=Path(paths.backbone_onnx),
                      check_dir=Path(paths.onnx_check), cache=cache, rows_out=Path(paths.feature_rows))


if __name__ == "__main__":
    run(main, "featurize")
