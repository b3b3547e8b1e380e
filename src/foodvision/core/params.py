"""params.yaml, parsed into frozen dataclasses and validated before any heavy work starts.

params.yaml is the only place a default is written: the dataclasses type and check it. Every key is
required (a missing one is named), unknown keys catch typos like `train.epoch`, every value is typed and
range-checked, and every error names the dotted key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from foodvision.core.errors import FoodVisionError, shown

ENGINES = ("auto", "torch", "onnxruntime", "openvino")  # featurize.engine
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")  # what torch.device accepts of these, plus auto
MOVED = {"train.device": "moved to the top-level key device: move the line there",  # keys of older params.yaml
         "paths": "moved to dvc.yaml's `vars:` block (configuration, not an experiment parameter): delete it here "
                  "and make any path you changed there",
         "paths.export_metrics": "is now paths.export_check (the export check's figures, no longer a DVC metric): "
                                 "rename the key"}
PIPELINE = Path("dvc.yaml")  # its `vars:` block holds `paths:`, which DVC interpolates and the commands read
MAX_SEED = 2**32 - 1  # NumPy's seed range; torch's is wider
# YAML 1.1 (PyYAML) reads `1e-3` as a string: numbers in that form are accepted as floats
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ParamsError(FoodVisionError):
    pass


def check_sha256(value: str | None, key: str) -> None:
    if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ParamsError(f"{key} must be 64 hex digits or null, got {shown(value)}")


# Upper bounds that fit a machine, not only "positive": 10**12 would otherwise pass and die in a traceback.
MAX_IMAGE_BATCH = 1024  # images per forward pass (featurize; train with train.augment): ~0.6 MB each at 224 px
MAX_ROW_BATCH = 65536  # stored feature rows per training step (5 KB each for B0)
MAX_PROCESSES = 64  # featurize ranks on one machine
MAX_CACHE_GB = 100_000  # featurize.cache_gb: a number that fits a disk, not 1e300


def _check_count(value: int, key: str, upper: int, what: str) -> None:
    if not 0 < value <= upper:
        raise ParamsError(f"{key} must be a positive integer up to {upper:,} ({what}), got {value}")


@dataclass(frozen=True)
class DataParams:
    url: str
    sha256: str | None
    content_sha256: str | None
    max_extract_mb: int
    max_download_mb: int
    skip_corrupt: bool
    classes: tuple[str, ...] | None
    test_fraction: float
    val_fraction: float

    def __post_init__(self) -> None:
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            raise ParamsError(f"data.classes must list at least 2 distinct class names, or be null for all; "
                              f"got {shown(list(self.classes))}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ParamsError(f"data.test_fraction must be between 0 and 1, got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ParamsError(f"data.val_fraction must be in [0, 1) (0 = no validation cut), got {self.val_fraction}")
        for key in ("max_extract_mb", "max_download_mb"):
            if getattr(self, key) <= 0:
                raise ParamsError(f"data.{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("sha256", "content_sha256"):
            check_sha256(getattr(self, key), f"data.{key}")


@dataclass(frozen=True)
class ModelParams:
    name: str
    weights: str | None
    weights_url: str | None
    sha256: str | None
    dropout: float

    def __post_init__(self) -> None:
        check_sha256(self.sha256, "model.sha256")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class FeaturizeParams:
    batch_size: int
    processes: int  # > 1: torchrun, one rank each (byte-identical outputs, so not a DVC param dep)
    precision: str
    engine: str  # what runs the frozen body: `auto` picks by a fixed rule per device and precision
    cache_dir: str | None  # where rows are kept by image content; null = the user's cache folder
    cache_gb: float  # its bound (0 = no cache); like processes, not a DVC param dep: the outputs do not depend on it

    def __post_init__(self) -> None:
        if not (0 <= self.cache_gb <= MAX_CACHE_GB and math.isfinite(self.cache_gb)):
            raise ParamsError(f"featurize.cache_gb must be between 0 (no cache) and {MAX_CACHE_GB:,}, got "
                              f"{shown(self.cache_gb)}")
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ParamsError("featurize.cache_dir must be a folder, or null for the user's cache folder; "
                              "to turn the cache off set featurize.cache_gb: 0")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ParamsError(f"featurize.precision must be fp32, bf16 or fp16, got {shown(self.precision)}")
        if self.engine not in ENGINES:
            raise ParamsError(f"featurize.engine must be one of {', '.join(ENGINES)}, got {shown(self.engine)}")
        _check_count(self.batch_size, "featurize.batch_size", MAX_IMAGE_BATCH, "images per forward pass")
        _check_count(self.processes, "featurize.processes", MAX_PROCESSES, "ranks on this machine")


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int
    lr: float
    augment: bool
    patience: int

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ParamsError(f"train.epochs must be a positive integer, got {self.epochs}")
        if self.patience < 0:
            raise ParamsError(f"train.patience must be >= 0 (0 = run every epoch), got {self.patience}")
        _check_count(self.batch_size, "train.batch_size", MAX_IMAGE_BATCH if self.augment else MAX_ROW_BATCH,
                     "images per step with train.augment" if self.augment else "feature rows per step")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParamsError(f"train.lr must be a finite number > 0, got {self.lr}")


MAX_BLOCKS = 64  # more than any torchvision backbone has


@dataclass(frozen=True)
class FinetuneParams:
    blocks: int  # 0: the frozen backbone, the article's recipe
    epochs: int
    batch_size: int
    lr: float  # the head's
    backbone_lr: float

    def __post_init__(self) -> None:
        if not 0 <= self.blocks <= MAX_BLOCKS:
            raise ParamsError(f"finetune.blocks must be 0 (frozen backbone) or a number of blocks up to {MAX_BLOCKS}, "
                              f"got {self.blocks}")
        if self.epochs <= 0:
            raise ParamsError(f"finetune.epochs must be a positive integer, got {self.epochs}")
        _check_count(self.batch_size, "finetune.batch_size", MAX_IMAGE_BATCH, "images per step")
        for key in ("lr", "backbone_lr"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ParamsError(f"finetune.{key} must be a finite number > 0, got {value}")


MAX_FOLDS = 20


@dataclass(frozen=True)
class AuditParams:
    folds: int  # K of the out-of-sample probabilities
    near_duplicate: float  # the cosine similarity from which two images count as the same photo

    def __post_init__(self) -> None:
        if not 2 <= self.folds <= MAX_FOLDS:
            raise ParamsError(f"audit.folds must be an integer from 2 to {MAX_FOLDS}, got {self.folds}")
        if not 0.0 < self.near_duplicate <= 1.0:
            raise ParamsError(f"audit.near_duplicate must be a cosine similarity in (0, 1], got {self.near_duplicate}")


@dataclass(frozen=True)
class PredictParams:
    num_samples: int
    images: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ParamsError(f"predict.num_samples must be >= 0, got {self.num_samples}")


@dataclass(frozen=True)
class PathsParams:
    """Where each stage reads and writes: `paths:` in dvc.yaml's `vars:`, which its stages use as `${paths.*}`.
    Not in params.yaml, whose every key is a column of `dvc exp show`: a path is not an experiment parameter."""

    inputs_data: str  # local inputs placed here are DVC deps of the stage that reads them
    inputs_weights: str
    inputs_images: str
    raw: str
    spec: str
    pretrained: str
    transform: str
    features: str
    feature_rows: str
    summary: str
    model: str
    train_metrics: str
    history: str
    curves: str
    eval_metrics: str
    per_class: str
    confusion_csv: str
    confusion_png: str
    hardest: str
    audit_metrics: str
    audit_issues: str
    audit_labels: str
    audit_pairs: str
    predictions: str
    predictions_json: str
    examples: str
    backbone_onnx: str
    onnx_check: str
    onnx: str
    export_check: str

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
    seed: int
    device: str  # the torch device of featurize, train and (a fine-tuned model's backbone) evaluate
    data: DataParams
    model: ModelParams
    featurize: FeaturizeParams
    train: TrainParams
    finetune: FinetuneParams
    audit: AuditParams
    predict: PredictParams

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ParamsError(f"seed must be between 0 and {MAX_SEED} (2**32 - 1), got {self.seed}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ParamsError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {shown(self.device)}")


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Read and validate the whole file: a stage fails in a second, not after an hour of work."""
    raw = read_yaml(Path(path))
    return parse(Params, raw if raw is not None else {}, "")


MAX_NESTING = 50  # YAML levels: params.yaml has 3; PyYAML recurses once per level, and Python's stack ends


def read_yaml(path: Path) -> Any:
    """A project file's YAML, or one line saying what is wrong with it: missing, not UTF-8, not YAML, nested
    deeper than any params file needs (100,000 levels would otherwise end in a 3,000-line RecursionError)."""
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the project root, where {path.name} lives")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                          "save it as UTF-8") from None
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events, no recursion: the depth is checked first
            depth += isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
            depth -= isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent))
            if depth > MAX_NESTING:
                raise ParamsError(f"{path} nests more than {MAX_NESTING} levels deep: not a params file")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None


def load_paths(path: Path = PIPELINE) -> PathsParams:
    """`paths:` from the `vars:` of dvc.yaml, validated: DVC itself would only refuse a bad one after the work."""
    return _paths_in(read_yaml(Path(path)) or {}, Path(path))


def _paths_in(pipeline: Any, path: Path) -> PathsParams:
    if not isinstance(pipeline, dict):
        raise ParamsError(f"{path} must be a mapping of keys (stages:, vars:, ...)")
    found = [v["paths"] for v in pipeline.get("vars") or [] if isinstance(v, dict) and "paths" in v]
    if len(found) != 1:
        raise ParamsError(f"{path} must have one `paths:` mapping under `vars:` (every stage's files); "
                          "the committed dvc.yaml has it")
    return parse(PathsParams, found[0], "paths.", file=path.name)


def stage_outputs(stage: str, path: Path = PIPELINE) -> list[Path]:
    """The files and folders dvc.yaml says `stage` writes (its `outs:`, `${paths.*}` filled in): what moves
    together (`core.files.outputs_together`)."""
    pipeline = read_yaml(Path(path)) or {}
    paths = _paths_in(pipeline, Path(path))
    stages = pipeline.get("stages") or {}
    outs = (stages.get(stage) or {}).get("outs") or [] if isinstance(stages, dict) else []
    names = [next(iter(out)) if isinstance(out, dict) else out for out in outs]
    return [Path(re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(getattr(paths, m.group(1))), str(name))) for name in names]


def project_paths() -> PathsParams | None:
    """The `paths:` of the project a command runs in (dvc.yaml in the current folder), None outside one:
    the commands' default files are the ones the stages wrote, whatever `paths.*` says."""
    return load_paths(PIPELINE) if PIPELINE.is_file() else None


def required_project_paths() -> PathsParams:
    """`project_paths`, where a command cannot go on without them (no --model given)."""
    paths = project_paths()
    if paths is None:
        raise ParamsError(f"no dvc.yaml in {Path.cwd()}: run inside the project, or give --model MODEL.onnx")
    return paths


def parse(cls: type, raw: Any, prefix: str, file: str = "params.yaml") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types recursively."""
    where = prefix.rstrip(".") or file
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} must be a mapping of keys, got {type(raw).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in raw if k not in fields), key=str)  # keys may be numbers, dates, null
    moved = f"{prefix}{unknown[0]}" if unknown else ""
    if moved in MOVED:
        raise ParamsError(f"{moved} {MOVED[moved]}")
    if unknown:
        meant = difflib.get_close_matches(str(unknown[0]), fields, n=1, cutoff=0.6)
        hint = f"did you mean {prefix}{meant[0]}? " if meant else ""
        raise ParamsError(
            f"unknown key {prefix}{shown(unknown[0], quote=False)}; {hint}"
            f"accepted keys here: {', '.join(prefix + k for k in fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name in fields:
        key = prefix + name
        if name not in raw:  # params.yaml is the one place defaults live, as DVC needs every declared key
            raise ParamsError(f"missing key {key} in {file}; the committed {file} has it with its default")
        values[name] = _coerce(hints[name], raw[name], key, file)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, file: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key + ".", file)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(inner, value, key, file)
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
