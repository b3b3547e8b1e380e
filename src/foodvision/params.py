"""params.yaml, parsed into frozen dataclasses and validated before any heavy work starts.

Every key is checked (unknown keys catch typos like `train.epoch`), every value typed and
range-checked, and every error names the dotted key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from foodvision.errors import FoodVisionError

DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")  # what torch.device accepts of these, plus auto
MAX_SEED = 2**32 - 1  # NumPy's seed range; torch's is wider
SHOWN = 80  # characters of a value quoted in an error message
# YAML 1.1 (PyYAML) reads `1e-3` as a string: numbers in that form are accepted as floats
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ParamsError(FoodVisionError):
    pass


def check_sha256(value: str | None, key: str) -> None:
    if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ParamsError(f"{key} must be 64 hex digits or null, got {shown(value)}")


def shown(value: Any, quote: bool = True) -> str:
    """A value as an error message quotes it: at most SHOWN characters (an alias bomb is megabytes)."""
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict, short.maxlevel = SHOWN, SHOWN, 6, 6, 2
    text = short.repr(value)
    text = text if quote or not isinstance(value, str) else value
    return text if len(text) <= SHOWN else text[:SHOWN - 1] + "…"


# Upper bounds that fit a machine, not only "positive": 10**12 would otherwise pass and die in a traceback.
MAX_IMAGE_BATCH = 1024  # images per forward pass (featurize; train with train.augment): ~0.6 MB each at 224 px
MAX_ROW_BATCH = 65536  # stored feature rows per training step (5 KB each for B0)
MAX_PROCESSES = 64  # featurize ranks on one machine


def _check_count(value: int, key: str, upper: int, what: str) -> None:
    if not 0 < value <= upper:
        raise ParamsError(f"{key} must be a positive integer up to {upper:,} ({what}), got {value}")


@dataclass(frozen=True)
class DataParams:
    url: str
    sha256: str | None = None
    content_sha256: str | None = None
    max_extract_mb: int = 5000
    max_download_mb: int = 10000
    skip_corrupt: bool = False
    classes: tuple[str, ...] | None = None
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            raise ParamsError(f"data.classes must list at least 2 distinct class names, or be null for all; "
                              f"got {shown(list(self.classes))}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ParamsError(f"data.test_fraction must be between 0 and 1, got {self.test_fraction}")
        for key in ("max_extract_mb", "max_download_mb"):
            if getattr(self, key) <= 0:
                raise ParamsError(f"data.{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("sha256", "content_sha256"):
            check_sha256(getattr(self, key), f"data.{key}")


@dataclass(frozen=True)
class ModelParams:
    name: str = "efficientnet_b0"
    weights: str | None = "DEFAULT"
    weights_url: str | None = None
    sha256: str | None = None
    dropout: float = 0.2

    def __post_init__(self) -> None:
        check_sha256(self.sha256, "model.sha256")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class FeaturizeParams:
    batch_size: int = 32
    processes: int = 1  # > 1: torchrun, one rank each (byte-identical outputs, so not a DVC param dep)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ParamsError(f"featurize.precision must be fp32, bf16 or fp16, got {shown(self.precision)}")
        _check_count(self.batch_size, "featurize.batch_size", MAX_IMAGE_BATCH, "images per forward pass")
        _check_count(self.processes, "featurize.processes", MAX_PROCESSES, "ranks on this machine")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.001
    device: str = "auto"
    augment: bool = False

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ParamsError(f"train.epochs must be a positive integer, got {self.epochs}")
        _check_count(self.batch_size, "train.batch_size", MAX_IMAGE_BATCH if self.augment else MAX_ROW_BATCH,
                     "images per step with train.augment" if self.augment else "feature rows per step")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParamsError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ParamsError(f"train.device must be one of {', '.join(DEVICES)} (or cuda:N), got {shown(self.device)}")


@dataclass(frozen=True)
class PredictParams:
    num_samples: int = 3
    images: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ParamsError(f"predict.num_samples must be >= 0, got {self.num_samples}")


@dataclass(frozen=True)
class PathsParams:
    """Where each stage reads and writes: dvc.yaml uses the same keys through `${paths.*}`."""

    inputs_data: str = "inputs/data"  # local inputs placed here are DVC deps of the stage that reads them
    inputs_weights: str = "inputs/weights"
    inputs_images: str = "inputs/images"
    raw: str = "data/raw/dataset.zip"
    spec: str = "data/prepared/spec.json"
    pretrained: str = "models/pretrained/backbone.pth"
    transform: str = "models/pretrained/transform.json"
    features: str = "data/features"
    summary: str = "models/summary.txt"
    model: str = "models/model.safetensors"
    train_metrics: str = "metrics/train.json"
    history: str = "plots/train/history.csv"
    curves: str = "plots/train/loss_curves.png"
    eval_metrics: str = "metrics/eval.json"
    confusion_csv: str = "plots/eval/confusion.csv"
    confusion_png: str = "plots/eval/confusion.png"
    predictions: str = "plots/predictions"
    predictions_json: str = "plots/predictions.json"
    examples: str = "data/examples"
    backbone_onnx: str = "models/backbone.onnx"
    onnx_check: str = "data/onnx_check"
    onnx: str = "models/model.onnx"
    export_metrics: str = "metrics/export.json"

    def __post_init__(self) -> None:
        """Each path relative, inside the project, and its own: DVC refuses the rest only after the work."""
        seen: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            parts = value.replace("\\", "/").split("/")
            normal = "/".join(p for p in parts if p not in ("", "."))
            if not normal or value.startswith(("/", "~")) or ".." in parts or ":" in parts[0]:
                raise ParamsError(f"paths.{field.name} must be a relative path inside the project, got "
                                  f"{shown(value)}")
            if normal in seen:
                raise ParamsError(f"paths.{field.name} and paths.{seen[normal]} are both {shown(normal)}: "
                                  "give each its own path")
            seen[normal] = field.name


@dataclass(frozen=True)
class Params:
    data: DataParams
    seed: int = 42
    model: ModelParams = ModelParams()
    featurize: FeaturizeParams = FeaturizeParams()
    train: TrainParams = TrainParams()
    predict: PredictParams = PredictParams()
    paths: PathsParams = PathsParams()

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ParamsError(f"seed must be between 0 and {MAX_SEED} (2**32 - 1), got {self.seed}")


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Read and validate the whole file: a stage fails in a second, not after an hour of work."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the project root, where params.yaml lives")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    return parse(Params, raw if raw is not None else {}, "")


def parse(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types recursively."""
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} must be a mapping of keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in fields), key=str)  # keys may be numbers, dates, null
    if unknown:
        raise ParamsError(
            f"unknown key {prefix}{shown(unknown[0], quote=False)}; "
            f"accepted keys here: {', '.join(prefix + k for k in fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key = prefix + name
        if name not in raw:
            if field.default is dataclasses.MISSING:
                raise ParamsError(f"missing key {key} in params.yaml")
            continue
        values[name] = _coerce(hints[name], raw[name], key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        if value is None:  # `images:` with nothing under it
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ParamsError(f"{key} must be a list of strings, got {shown(value)}")
        return tuple(value)
    if hint is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }[hint]
    if not ok:
        raise ParamsError(f"{key} must be {hint.__name__}, got {shown(value)}")
    return float(value) if hint is float else value
