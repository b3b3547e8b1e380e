"""DVC stage `audit`: the data's likely label errors, exact and near duplicates, train/test leaks and outliers,
from the stored features (paths.audit_metrics, paths.audit_issues, and two contact sheets)."""

from pathlib import Path

from foodvision.audit import Outputs, audit
from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run


def main() -> None:
    params, paths = load_params(), load_paths()
    audit(Path(paths.features), Path(paths.spec),
          Outputs(Path(paths.audit_metrics), Path(paths.audit_issues), Path(paths.audit_labels),
                  Path(paths.audit_pairs)),
          folds=params.audit.folds, near_duplicate=params.audit.near_duplicate, seed=params.seed)


if __name__ == "__main__":
    run(main, "audit")
