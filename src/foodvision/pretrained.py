"""pretrained stage: the backbone's weights file, a tracked artifact under models/pretrained/.

Fetched from the URL torchvision's weights enum publishes (or `model.weights_url`), checked
against the sha256 prefix in its file name (torchvision's `name-<sha256 prefix>.pth` convention),
then loaded strictly into the architecture so a wrong file fails here, not mid-training. Nothing is
downloaded into torch's cache outside the project.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.hub import HASH_REGEX

from foodvision import lite0
from foodvision.core.errors import ModelError
from foodvision.core.files import atomic_path, remove_stale, temp_prefix, write_json
from foodvision.fetch import FetchError, fetch, redact, source_name
from foodvision.model import Weights, build_backbone, eval_transform, load_pretrained, resolve_weights
from foodvision.statedict import load_state_dict_file

RANDOM_INIT_SEED = 0
MAX_WEIGHTS_MB = 4096  # torchvision's largest classification weights (ViT-H/14) are about 2.5 GB


def fetch_pretrained(name: str, weights: str | None, weights_url: str | None, dest: Path, *, sha256: str | None,
                     transform_out: Path | None = None) -> Path:
    """Write the backbone's state dict to `dest`, and the eval transform its weights expect to `transform_out`.

    `sha256` (params `model.sha256`) pins the fetched file in full; without it only the 8-digit prefix
    in torchvision's file names is checked.

    `weights: null` writes torchvision's random init under a fixed seed, so the file is reproducible
    and does not depend on params `seed` (which would re-fetch real weights whenever it changed).
    """
    source = resolve_weights(name, weights)
    if source is None:
        if weights_url is not None:
            raise ModelError("model.weights_url is set but model.weights is null; set model.weights "
                             "to the member the file was trained as (e.g. DEFAULT) or clear weights_url")
        torch.manual_seed(RANDOM_INIT_SEED)
        with atomic_path(dest) as tmp:
            torch.save(build_backbone(name).state_dict(), tmp)
        print(f"model.weights is null: wrote a randomly initialised {name} to {dest}")
    else:
        _fetch(name, source, weights_url or source.url, dest, sha256)
    if transform_out is not None:  # last: it exists only beside a complete weights file
        write_json(transform_out, eval_transform(name, weights))
    return dest


def _fetch(name: str, source: Weights, url: str, dest: Path, sha256: str | None) -> None:
    """Download, hash-check, convert and strictly load the weights before `dest` appears."""
    match = HASH_REGEX.search(source_name(url))
    prefix = match.group(1) if match and match.group(1) else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=temp_prefix(dest, "fetch."), suffix=".tmp") as tmp:
        staged = Path(tmp) / "weights.pth"
        try:
            digest = fetch(url, staged, sha256=sha256, sha256_prefix=prefix, what=f"pretrained weights for {name}",
                           max_bytes=MAX_WEIGHTS_MB * 2**20, limit_name=f"{MAX_WEIGHTS_MB} MB")
        except FetchError as exc:
            if url != source.url or name == lite0.NAME:
                raise
            raise FetchError(f"{exc}; or, offline, use model.name: {lite0.NAME}, whose weights come with the "
                             "setup") from None
        try:
            state = load_state_dict_file(staged)
            if source.convert is not None:  # a foreign layout: store it with torchvision's keys
                try:
                    state = source.convert(state)
                except KeyError as exc:
                    raise ModelError(f"{redact(url)} has an unexpected tensor {exc}; "
                                     "it is not a weights file for this backbone") from None
                torch.save(state, staged)
            load_pretrained(name, staged, state)  # strict: refuse a file for another architecture
        except ModelError as exc:  # name the user's file, not our temporary copy of it
            raise ModelError(str(exc).replace(str(staged), redact(url))) from None
        staged.replace(dest)
    check = f"matches its name's prefix {prefix}" if prefix else "no hash in its file name to check"
    print(f"fetched {source.label} from {redact(url)} to {dest} (sha256 {digest[:12]}…, {check})")

