"""featurize: streamed feature files, the decode thread, and what the stage records."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foodvision.core.device import decode_workers
from foodvision.data import EvalTransform, build_transform, make_loader, prefetched, threaded
from foodvision.features import FeatureFile, NpyWriter, load_index
from foodvision.images import open_rgb


def test_feature_files_are_plain_npy_in_the_specs_order(trained):
    index = load_index(trained.features)
    assert index.model == "efficientnet_b0" and index.feature_dim == 1280 and index.head == "classifier"
    assert index.split("test").paths[:2] == ["test/pizza/000.jpg", "test/pizza/001.jpg"]
    assert index.split("train").labels == [0] * 4 + [1] * 4 + [2] * 4
    stored = np.load(trained.features / "train.npy")
    assert stored.shape == (12, 1280) and stored.dtype == np.float32
    rows = FeatureFile(trained.features / "train.npy", index.split("train").labels)
    assert np.array_equal(rows.take([5, 0, 11]), stored[[5, 0, 11]]) and rows.labels[[5, 0, 11]].tolist() == [1, 0, 2]
    batches = list(rows.batches(5))
    assert [len(b[0]) for b in batches] == [5, 5, 2] and [b[1].tolist() for b in batches][-1] == [2, 2]
    assert np.array_equal(np.concatenate([b[0] for b in batches]), stored)


def test_a_short_or_foreign_feature_file_is_refused(tmp_path):
    from foodvision.core.errors import DatasetError

    writer = NpyWriter(tmp_path / "f.npy", 3, 4)
    writer.write(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="2 of 3 rows written"):
        writer.close()
    with pytest.raises(DatasetError, match=r"f.npy is .* bytes, expected .*truncated"):
        FeatureFile(tmp_path / "f.npy", [0, 0, 0])
    np.save(tmp_path / "g.npy", np.zeros((3, 4), dtype=np.float64))
    with pytest.raises(DatasetError, match="not 3 rows of float32"):
        FeatureFile(tmp_path / "g.npy", [0, 0, 0])
    (tmp_path / "h.npy").write_text("<html>")
    with pytest.raises(DatasetError, match=r"h.npy is not a .npy file.*dvc repro featurize"):
        FeatureFile(tmp_path / "h.npy", [0])
    np.save(tmp_path / "k.npy", np.ones((3, 4), dtype=np.float32))
    rows = FeatureFile(tmp_path / "k.npy", [0, 0, 0])
    assert rows.take([2, 0]).tolist() == [[1.0] * 4] * 2
    with open(tmp_path / "k.npy", "r+b") as f:  # cut short by someone else while a stage reads it
        f.truncate(f.seek(0, 2) - 1)
    with pytest.raises(DatasetError, match=r"k.npy ended before row 2; run `dvc repro featurize`"):
        rows.take([0, 2])
    with pytest.raises(DatasetError, match=r"k.npy ended before row 2; run `dvc repro featurize`"):
        list(rows.batches(3))


def test_the_decode_thread_hands_on_errors_and_stops_with_its_consumer():
    def batches():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for b in prefetched(batches()):
            got.append(b)
    assert got == [1, 2]

    endless = prefetched(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()  # the consumer stops early: the producer thread ends too
    assert not [t for t in threading.enumerate() if t.name == "featurize-decode"]


LITE0 = {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
         "antialias": True}
IMAGENET = {"resize_size": 232, "crop_size": 224, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "antialias": True}


@pytest.mark.parametrize("transform", [LITE0, IMAGENET], ids=["lite0", "imagenet"])
def test_the_eval_transform_gives_torchvisions_bytes(transform):
    rng = np.random.default_rng(0)
    for size in [(512, 384), (384, 512), (300, 300), (641, 257), (225, 900)]:
        smooth = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize(size, Image.Resampling.BILINEAR)
        noisy = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for im in (image, noisy):
            ours, theirs = EvalTransform(transform)(im), build_transform(transform)(im)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), size


def test_the_eval_transform_gives_torchvisions_bytes_on_real_photos(shared_data):
    with zipfile.ZipFile(shared_data / "pizza_steak_sushi.zip") as z:
        names = [n for n in sorted(z.namelist()) if n.endswith(".jpg")][::5]
        for name in names:
            im = open_rgb(io.BytesIO(z.read(name)), LITE0["resize_size"])
            for transform in (LITE0, IMAGENET):
                assert torch.equal(EvalTransform(transform)(im), build_transform(transform)(im)), name


def test_threaded_decoding_keeps_the_loaders_order_and_its_errors():
    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            if i == 47:
                raise OSError("member 47 unreadable")
            return torch.full((2,), float(i)), i

    loader = make_loader(Slow(), 8, shuffle=False, seed=0)
    got = []
    with pytest.raises(OSError, match="member 47"):
        for images, labels in threaded(loader, 3):
            got.append(labels.tolist())
            assert images[:, 0].tolist() == labels.tolist()
    assert [i for batch in got for i in batch] == list(range(40)), "in order, then the error"


def test_decode_workers_fit_the_machine():
    assert decode_workers("cpu", cpus=2) == 0, "2 cores: a thread, not a process"
    assert decode_workers("cpu", cpus=16) == 1
    assert decode_workers("cuda", cpus=16) == 8
    assert decode_workers("cuda", cpus=2) == 1
    # torchrun ranks on one node share its cores
    assert decode_workers("cuda", cpus=16, ranks_here=4) == 3
    assert decode_workers("cpu", cpus=16, ranks_here=4) == 1
    assert decode_workers("cpu", cpus=16, ranks_here=8) == 0


def test_missing_or_damaged_index_names_the_stage_that_makes_it(tmp_path):
    from foodvision.core.errors import DatasetError

    with pytest.raises(DatasetError, match=r"index.json not found: run `dvc repro featurize` first"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{half")
    with pytest.raises(DatasetError, match=r"cannot read .*index.json .*run `dvc repro featurize`"):
        load_index(tmp_path)


def test_precision_is_chosen_by_what_the_hardware_has():
    from foodvision.core.errors import ModelError
    from foodvision.precision import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu, cpu_flags={"avx2", "avx512_bf16"}) == torch.bfloat16
    assert autocast_dtype("bf16", cpu, cpu_flags={"avx2", "amx_bf16"}) == torch.bfloat16
    with pytest.raises(ModelError, match="neither AVX-512-BF16 nor AMX, where bf16 ran the backbone about 17x slower"):
        autocast_dtype("bf16", cpu, cpu_flags={"avx2", "fma"})
    with pytest.raises(ModelError, match="fp16 needs a CUDA GPU, not cpu"):
        autocast_dtype("fp16", cpu)


def test_bf16_features_stay_close_to_fp32_where_the_cpu_has_bf16(trained, tmp_path):
    from foodvision.core.device import cpu_flags
    from foodvision.featurize import featurize

    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no bf16 arithmetic (the stage refuses bf16 here, tested above)")
    featurize(trained.spec, trained.pretrained, trained.transform, tmp_path / "bf16", model_name="efficientnet_b0",
              batch_size=4, device="cpu", skip_corrupt=False, summary_out=tmp_path / "s.txt", precision="bf16",
              engine="auto", onnx_out=tmp_path / "backbone.onnx", check_dir=tmp_path / "check")
    assert load_index(tmp_path / "bf16").engine == "openvino"
    fp32, bf16 = np.load(trained.features / "test.npy"), np.load(tmp_path / "bf16" / "test.npy")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)
    assert np.abs(bf16 - fp32).max() <= 0.1 * np.abs(fp32).max()
    # the exported graph is still held to torch in float32 on every test image, whatever stored the features
    check = json.loads((tmp_path / "check" / "check.json").read_text())
    assert check["torch_reference"] == "float32 backbone (features stored by OpenVINO in bf16)"
    assert check["backbone_max_abs_diff"] <= 1e-4 and (tmp_path / "check" / "reference.npy").exists()


def test_the_engine_rule_is_fixed_per_device_and_precision():
    """`auto` never races timings: ONNX Runtime on a CPU in fp32, torch for autocast and on GPUs; a pinned engine
    that cannot run there is one line naming the key."""
    from foodvision.backbone import pick_engine
    from foodvision.core.errors import ModelError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_engine("auto", "fp32", cpu) == "onnxruntime"
    assert pick_engine("auto", "bf16", cpu) == "openvino"
    assert pick_engine("auto", "fp32", cuda) == pick_engine("auto", "bf16", cuda) == "torch"
    assert pick_engine("torch", "fp32", cpu) == "torch" and pick_engine("openvino", "fp32", cpu) == "openvino"
    with pytest.raises(ModelError, match=r"^featurize.engine onnxruntime runs fp32 on the CPU only, not bf16 on cpu"):
        pick_engine("onnxruntime", "bf16", cpu)
    with pytest.raises(ModelError, match=r"^featurize.engine openvino runs on the CPU only, not cuda"):
        pick_engine("openvino", "fp32", cuda)


def test_onnx_runtime_features_are_the_exported_graphs_whatever_the_batch(trained, tmp_path):
    """The fixture's features came from ONNX Runtime (auto on a CPU): the graph model.onnx serves. Another batch
    size gives the same bytes (an image's features do not depend on its batch); torch's differ at float rounding."""
    from foodvision.featurize import featurize

    def run(name: str, engine: str, batch_size: int) -> Path:
        featurize(trained.spec, trained.pretrained, trained.transform, tmp_path / name, model_name="efficientnet_b0",
                  batch_size=batch_size, device="cpu", skip_corrupt=False, summary_out=tmp_path / "s.txt",
                  precision="fp32", engine=engine)
        return tmp_path / name

    assert load_index(trained.features).engine == "onnxruntime"
    by_five = run("five", "onnxruntime", 5)
    for split in ("train", "test"):
        assert (by_five / f"{split}.npy").read_bytes() == (trained.features / f"{split}.npy").read_bytes(), split
    by_torch = run("torch", "torch", 4)
    assert load_index(by_torch).engine == "torch"
    ours, torchs = np.load(trained.features / "test.npy"), np.load(by_torch / "test.npy")
    assert np.abs(ours - torchs).max() <= 1e-4 and np.abs(torchs).max() > 0


def test_openvino_features_do_not_depend_on_the_batch_and_stay_close_to_onnx_runtimes(trained, tmp_path):
    from foodvision.featurize import featurize

    pytest.importorskip("openvino", reason="OpenVINO installs on x86 machines only")
    runs = []
    for batch_size in (4, 5):
        featurize(trained.spec, trained.pretrained, trained.transform, tmp_path / str(batch_size),
                  model_name="efficientnet_b0", batch_size=batch_size, device="cpu", skip_corrupt=False,
                  summary_out=tmp_path / "s.txt", precision="fp32", engine="openvino")
        runs.append({s: (tmp_path / str(batch_size) / f"{s}.npy").read_bytes() for s in ("train", "test")})
    assert runs[0] == runs[1], "another batch size, the same bytes"
    assert load_index(tmp_path / "4").engine == "openvino"
    ours, ort = np.load(tmp_path / "4" / "test.npy"), np.load(trained.features / "test.npy")
    assert np.abs(ours - ort).max() <= 1e-4
