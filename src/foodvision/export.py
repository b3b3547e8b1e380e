"""export stage: the trained head attached to the backbone's ONNX graph, one self-contained model file.

`featurize` exported and checked the frozen backbone (`export_backbone`) once per feature pass; here, in every
experiment, the head (Dropout + Linear, in eval mode a Gemm) becomes an ONNX graph of its own and
`onnx.compose` joins it to the backbone: no second `torch.onnx.export`, no torchvision, no torch (the
head's weights come from the safetensors checkpoint; its logits, `features @ weight.T + bias`, are
torch's to float32 rounding, which a test checks). Three checks, each failing the stage with nothing
written:

- the head: ONNX Runtime against the checkpoint's head on every stored test feature row;
- the whole model on every test image: the head on ONNX Runtime's stored backbone features (from
  `export_backbone`) against the head on torch's features of the same images;
- the file as a runtime loads it: a fixed sample of decoded test images through the joined model.

Logits are compared relative to the size of the sum behind each (`MAX_REL_DIFF`); features, in
`export_backbone`, in absolute terms (`onnx_check.MAX_ABS_DIFF`).

So the cost of an experiment's export is flat in the number of images, apart from reading feature rows.
ONNX Runtime runs the model without the training stack: `foodvision.serve` uses it, and so can any ONNX
runtime. The file carries its classes and eval transform as metadata, so it is all a runtime needs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from foodvision.checkpoint import head_logits, head_weights, read_checkpoint
from foodvision.core.errors import ModelError
from foodvision.core.files import atomic_path, write_json
from foodvision.features import FeatureIndex, load_index, open_split, rows_per_read
from foodvision.images import eval_array, open_rgb
from foodvision.onnx_check import OPSET, ort_features, own_reference, read_figures
from foodvision.store import ImageStore

# the largest logit difference accepted, relative to the size of the sum that makes each logit (|features| @ |W|.T
# + |b|, taken as at least 1): a high train.lr grows the head's weights and so its logits (hundreds at lr 0.1), whose
# float32 rounding alone would fail an absolute bound; a wrong weight, bias or feature still moves it by far more
MAX_REL_DIFF = 1e-4
SAMPLE = 32  # decoded test images run through the joined file in every experiment


def export(model_path: Path, features_dir: Path, backbone_onnx: Path, check_dir: Path, *, onnx_out: Path,
           metrics_out: Path) -> dict[str, Any]:
    """Write `onnx_out` and the checks' figures to `metrics_out`; return the figures.

    A fine-tuned checkpoint has its own backbone: it is exported and checked on every test image here, in a
    temporary folder, as `export_backbone` does the pretrained one (torch and torchvision, only then)."""
    ckpt = read_checkpoint(model_path)
    index = load_index(features_dir)
    if ckpt["class_names"] != index.classes:
        raise ModelError(f"{model_path} was trained on other classes than {features_dir}/index.json lists; "
                         "run `dvc repro` so train and export see the same data")
    if not index.split("test").labels:
        raise ModelError("the test split is empty: nothing to check the ONNX export on")
    if not ckpt.get("finetuned"):
        return _join(model_path, ckpt, features_dir, index, backbone_onnx, check_dir, onnx_out, metrics_out)
    from foodvision.backbone import checkpoint_body
    from foodvision.export_backbone import write_checked

    with tempfile.TemporaryDirectory(prefix="foodvision-export-") as tmp:
        own_onnx, own_check = Path(tmp) / "backbone.onnx", Path(tmp) / "check"
        body, _ = checkpoint_body(model_path)
        write_checked(body, ckpt["transform"], features_dir, index, onnx_out=own_onnx, check_dir=own_check,
                      torch_side=f"fine-tuned float32 backbone ({', '.join(ckpt['finetuned'])})")
        return _join(model_path, ckpt, features_dir, index, own_onnx, own_check, onnx_out, metrics_out)


def _join(model_path: Path, ckpt: dict[str, Any], features_dir: Path, index: FeatureIndex, backbone_onnx: Path,
          check_dir: Path, onnx_out: Path, metrics_out: Path) -> dict[str, Any]:
    import onnxruntime as ort

    backbone_figures = read_figures(check_dir)
    if backbone_figures.get("backbone") != ckpt["model_name"]:
        raise ModelError(f"{backbone_onnx} is a {backbone_figures.get('backbone')!r} backbone, but {model_path} "
                         f"holds {ckpt['model_name']!r}; run `dvc repro` so both see the same model")
    head = head_weights(model_path, ckpt)
    backbone = _load_onnx(backbone_onnx)
    head_graph = head_onnx(head, backbone.ir_version)
    data = joined_bytes(backbone, head_graph, ckpt["class_names"], ckpt["transform"], ckpt["model_name"])
    head_session = ort.InferenceSession(head_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    with atomic_path(onnx_out) as tmp:
        tmp.write_bytes(data)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        figures = {"backbone_max_abs_diff": backbone_figures["backbone_max_abs_diff"],
                   "torch_reference": backbone_figures["torch_reference"], "opset": OPSET,
                   "onnx_mb": round(len(data) / 2**20, 2)}
        figures.update(check_rows(head, head_session, features_dir, check_dir, index))
        figures.update(_check_sample(head, session, check_dir, features_dir, index, ckpt["transform"]))
        diffs = [figures[k] for k in ("max_abs_diff", "head_max_abs_diff", "sample_max_abs_diff")]
        relative = max(figures.pop("rows_rel_diff"), figures.pop("sample_rel_diff"))
        figures["max_rel_diff"] = float(f"{relative:.3g}")
        agreement = min(figures["argmax_agreement"], figures["sample_argmax_agreement"])
        if relative > MAX_REL_DIFF or agreement < 1.0:
            raise ModelError(f"the ONNX export of {model_path} disagrees with torch on the test images "
                             f"(max |logit difference| {max(diffs):.3g}, {relative:.3g} of the logits' scale; "
                             f"same class on {agreement:.2%}); not written. Report it with your torch and onnxruntime "
                             "versions")
    write_json(metrics_out, figures)
    print(f"export check: {figures['images']} test images through the head on ONNX Runtime's backbone features, "
          f"max |logit difference| {figures['max_abs_diff']:.3g}; head alone {figures['head_max_abs_diff']:.3g}; "
          f"{figures['sample_images']} decoded images through {onnx_out}: {figures['sample_max_abs_diff']:.3g}")
    return figures


def head_onnx(head: tuple[np.ndarray, np.ndarray], ir_version: int) -> Any:
    """The eval-mode head (Dropout + Linear), given as (weight, bias), as one Gemm: `features` -> `logits`."""
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = head
    classes, dim = weight.shape
    weights = [numpy_helper.from_array(weight.astype(np.float32), "head.weight"),
               numpy_helper.from_array(bias.astype(np.float32), "head.bias")]
    graph = helper.make_graph([helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"],
                                                transB=1)], "head",
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=ir_version)


def joined_bytes(backbone: Any, head: Any, classes: list[str], transform: dict[str, Any], name: str) -> bytes:
    """Backbone and head as one model (`images` -> `logits`) with its metadata; the same bytes for the same parts."""
    import onnx

    model = onnx.compose.merge_models(backbone, head, io_map=[("features", "features")])
    for key, value in (("classes", classes), ("transform", transform), ("backbone", name)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return model.SerializeToString(deterministic=True)


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # missing, or protobuf's DecodeError for a damaged file
        raise ModelError(f"{path} is not a readable ONNX file ({type(exc).__name__}); "
                         "run `dvc repro featurize`") from None


def check_rows(head: tuple[np.ndarray, np.ndarray], session: Any, features_dir: Path, check_dir: Path,
               index: FeatureIndex) -> dict[str, Any]:
    """Every test row, read in blocks that fit a fixed memory budget: the head on ONNX Runtime against the
    checkpoint's head on the stored features, and the head on ONNX Runtime's backbone features against the
    head on torch's float32 features (the stored ones, read once, unless featurize stored lower precision or
    ran ONNX Runtime; then the stored features, being ONNX Runtime's, are held against torch's too)."""
    labels = index.split("test").labels
    stored, own = open_split(features_dir, index, "test"), own_reference(check_dir, index)
    ort_rows = ort_features(check_dir, index)
    block = rows_per_read(stored.cols)
    references = own.batches(block) if own is not None else None
    head_worst, worst, relative, same = 0.0, 0.0, 0.0, 0
    for (x, _), (ort_x, _) in zip(stored.batches(block), ort_rows.batches(block)):
        logits, scale = head_logits(x, *head), logit_scale(x, head)
        alone = session.run(["logits"], {"features": x})[0]
        head_worst = max(head_worst, _worst(alone, logits))
        if references is None:  # the stored features are torch's float32 ones
            want, want_scale = logits, scale
        else:
            ref = next(references)[0]
            want, want_scale = head_logits(ref, *head), logit_scale(ref, head)
        got = session.run(["logits"], {"features": ort_x})[0]
        worst = max(worst, _worst(got, want))
        relative = max(relative, _worst(alone, logits, scale), _worst(got, want, want_scale))
        if references is not None and index.engine != "torch" and index.precision == "fp32":  # train's, evaluate's
            worst, relative = max(worst, _worst(logits, want)), max(relative, _worst(logits, want, want_scale))
        same += int((got.argmax(1) == want.argmax(1)).sum())
    for f in (stored, own, ort_rows):
        if f is not None:
            f.close()
    return {"images": len(labels), "max_abs_diff": float(f"{worst:.3g}"),
            "argmax_agreement": round(same / len(labels), 6), "head_max_abs_diff": float(f"{head_worst:.3g}"),
            "rows_rel_diff": relative}


def sample_rows(n: int, k: int = SAMPLE) -> list[int]:
    """`k` test rows spread evenly over the split (it is sorted by class, so every class is likely in)."""
    m = min(k, n)
    return sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})


def _check_sample(head: tuple[np.ndarray, np.ndarray], session: Any, check_dir: Path, features_dir: Path,
                  index: FeatureIndex, transform: dict[str, Any]) -> dict[str, Any]:
    """The joined file on a fixed sample of test images decoded as `featurize` decodes them, against the head on
    torch's features of them."""
    test = index.split("test")
    rows = sample_rows(len(test.paths))
    store = ImageStore(Path(index.root))
    images = np.stack([eval_array(open_rgb(store.read_at(test.paths[i], test.location(i)),
                                           transform["resize_size"]), transform) for i in rows])
    store.close()
    own = own_reference(check_dir, index)
    reference = own if own is not None else open_split(features_dir, index, "test")
    features = reference.take(rows)
    reference.close()
    want = head_logits(features, *head)
    got = session.run(["logits"], {"images": images})[0]
    return {"sample_images": len(rows), "sample_max_abs_diff": float(f"{_worst(got, want):.3g}"),
            "sample_argmax_agreement": round(float((got.argmax(1) == want.argmax(1)).mean()), 6),
            "sample_rel_diff": _worst(got, want, logit_scale(features, head))}


def logit_scale(features: np.ndarray, head: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The size of the sum behind each logit, |features| @ |W|.T + |b|: what float32 rounding and a feature
    difference are measured against."""
    weight, bias = head
    return np.abs(features) @ np.abs(weight).T + np.abs(bias)


def _worst(a: np.ndarray, b: np.ndarray, scale: np.ndarray | None = None) -> float:
    """The largest |a - b|, or with `scale` the largest |a - b| / max(scale, 1)."""
    if not a.size:
        return 0.0
    diff = np.abs(a - b)
    return float(diff.max() if scale is None else (diff / np.maximum(scale, 1.0)).max())
