"""The pipeline on the real pizza/steak/sushi archive, where ../shared/data has it (skips elsewhere)."""

from __future__ import annotations

import json

from test_pipeline import copy_project, set_params, sh


def test_pipeline_on_the_real_dataset(shared_data, tmp_path):
    project = copy_project(tmp_path)
    set_params(project, data__url=str(shared_data / "pizza_steak_sushi.zip"),
               data__sha256="97904b9e0cb6f4219a49661e7366e2578ec8e29ab700203175ecadf5bff9c179",
               model__weights=None, train__epochs=1, train__device="cpu",
               predict__images=[str(shared_data / "sushi.jpg")])
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "repro")

    spec = json.loads((project / "data/prepared/spec.json").read_text())
    assert spec["counts"] == {"train": {"pizza": 78, "steak": 75, "sushi": 72},
                              "test": {"pizza": 25, "steak": 19, "sushi": 31}}
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["samples"] == 75
    predictions = json.loads((project / "plots/predictions.json").read_text())
    assert len(predictions) == 4 and predictions[-1]["source"].endswith("sushi.jpg")
    assert sorted(p.name for p in (project / "plots/predictions").iterdir()) == sorted(p["plot"] for p in predictions)
