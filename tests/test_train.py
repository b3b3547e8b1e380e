import csv
import dataclasses
import json

import numpy as np
import torch
from conftest import project_params, train_tiny

from foodvision.checkpoint import read_checkpoint
from foodvision.core.device import torch_threads
from foodvision.fit import FeatureRows, fit_features, fit_images
from foodvision.head import new_head
from foodvision.loop import seed_everything
from foodvision.model import load_checkpoint
from foodvision.statedict import load_state_dict_file


def test_outputs_history_and_metrics(trained):
    rows = list(csv.DictReader(trained.history.open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # the held-out split is test without data.val_fraction (the article's curves)
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "held_out_loss", "held_out_acc"]
    for r in rows:
        # accuracy is over samples: 12 train and 6 test images, so it is a multiple of 1/12 and 1/6
        assert abs(float(r["train_acc"]) * 12 - round(float(r["train_acc"]) * 12)) < 1e-4
        assert abs(float(r["held_out_acc"]) * 6 - round(float(r["held_out_acc"]) * 6)) < 1e-4
    metrics = json.loads(trained.metrics.read_text())
    assert metrics["train_acc"] == float(rows[-1]["train_acc"]) and metrics["epoch"] == 2
    assert not {"test_acc", "test_loss", "val_loss"} & set(metrics), "test figures are evaluate's alone"
    assert set(metrics) == {"epoch", "train_loss", "train_acc"}, "nothing params.yaml or the summary already says"
    assert trained.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_is_the_articles_torchinfo_table(trained):
    text = trained.summary.read_text()
    assert "Total params: 4,011,391" in text and "Trainable params: 3,843" in text
    assert "[4, 3, 224, 224]" in text and "[4, 3]" in text  # input and output sizes for the spec's batch


def test_frozen_backbone_params_and_buffers_are_bit_identical_after_training(trained):
    before = load_state_dict_file(trained.pretrained)
    after = read_checkpoint(trained.model)["state_dict"]
    frozen = [k for k in after if not k.startswith("classifier.")]
    assert len(frozen) == len(before) - 2  # all but the old head's weight and bias
    assert any(k.endswith("running_mean") for k in frozen)
    changed = [k for k in frozen if not torch.equal(before[k], torch.from_numpy(after[k].copy()))]
    assert changed == []
    assert after["classifier.1.weight"].any()


def test_checkpoint_has_what_predict_needs(trained):
    model, ckpt = load_checkpoint(trained.model)
    assert ckpt["class_names"] == ["pizza", "steak", "sushi"]
    assert ckpt["model_name"] == "efficientnet_b0" and ckpt["head"] == "classifier"
    assert ckpt["transform"]["crop_size"] == 224
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 3)


def test_head_learns_the_tiny_dataset(tmp_path, server_url, dataset_zip, backbone_file):
    t = train_tiny(tmp_path, f"{server_url}/{dataset_zip.name}", f"{server_url}/{backbone_file.name}", epochs=6)
    rows = list(csv.DictReader(t.history.open()))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_same_seed_same_bytes_other_seed_differs(trained, tmp_path, server_url, dataset_zip, backbone_file):
    urls = f"{server_url}/{dataset_zip.name}", f"{server_url}/{backbone_file.name}"
    again = train_tiny(tmp_path / "again", *urls)
    assert again.history.read_bytes() == trained.history.read_bytes()
    assert again.metrics.read_bytes() == trained.metrics.read_bytes()
    assert again.model.read_bytes() == trained.model.read_bytes()  # in another folder, too
    other = train_tiny(tmp_path / "other", *urls, seed=7)
    a, c = (read_checkpoint(t.model)["state_dict"]["classifier.1.weight"] for t in (again, other))
    assert not np.array_equal(a, c)


def test_the_head_trains_on_one_thread_with_the_bytes_of_many(tmp_path):
    """train runs the head's small steps on one CPU thread (threads only wait on each other there, badly so
    when another process holds a core); the weights are bit for bit those of a run on every core, and the
    caller's thread count is given back."""
    from foodvision.features import FeatureFile, NpyWriter

    rng = np.random.default_rng(0)
    labels = {}
    for split, n in (("train", 640), ("test", 96)):
        writer = NpyWriter(tmp_path / f"{split}.npy", n, 1280)
        writer.write(rng.standard_normal((n, 1280)).astype(np.float32))
        writer.close()
        labels[split] = rng.integers(0, 3, n).tolist()
    params = dataclasses.replace(project_params().train, epochs=2)
    weights = []
    for threads in (2, 1):
        torch.manual_seed(0)
        head = new_head(1280, 3, 0.2)
        with torch_threads(threads):
            fit_features(head, FeatureRows(FeatureFile(tmp_path / "train.npy", labels["train"])),
                         FeatureRows(FeatureFile(tmp_path / "test.npy", labels["test"])), params, 42, torch.device("cpu"))
        weights.append(head[1].weight.detach().numpy().tobytes() + head[1].bias.detach().numpy().tobytes())
    assert weights[0] == weights[1]
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_heads_dropout_keeps_1_minus_p_of_units_independently_scaled_as_nn_dropout():
    """The head's own Dropout (its mask from raw CPU draws, the same on every CPU vendor) behaves as nn.Dropout."""
    from foodvision.head import Dropout

    torch.manual_seed(0)
    drop, ones = Dropout(p=0.2), torch.ones(1000, 1000, requires_grad=True)
    out = drop(ones)
    kept = out != 0
    assert set(out.unique().tolist()) == {0.0, 1 / 0.8}  # nn.Dropout's 1 / (1 - p) on the kept units
    assert abs(kept.float().mean().item() - 0.8) < 0.002  # 5 sigma of 10^6 draws
    lanes = kept.view(-1, 4)  # the four 16-bit quarters of each 64-bit draw are four independent units
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert abs((lanes[:, a] & lanes[:, b]).float().mean().item() - 0.64) < 0.005  # 5 sigma of 250,000 pairs
    assert abs(lanes.all(dim=1).float().mean().item() - 0.8**4) < 0.005
    for p in (0.05, 0.5, 0.9):  # p to 2**-16: the kept share follows other rates too
        torch.manual_seed(1)
        assert abs((Dropout(p=p)(torch.ones(1000, 1000)) != 0).float().mean().item() - (1 - p)) < 0.0025
    out.sum().backward()
    assert torch.equal(ones.grad, out.detach())  # the gradient goes through the kept units, scaled alike
    torch.manual_seed(0)
    with torch_threads(2):
        assert torch.equal(Dropout(p=0.2)(torch.ones(1000, 1000)), out.detach())  # the seed decides, not threads
    drop.eval()
    x = torch.randn(4, 8)
    assert drop(x) is x and Dropout(p=0.0)(x) is x


def test_stored_features_match_the_full_loop_on_images(trained):
    """Training the head on featurize's files equals the article's loop over images (frozen backbone, eval mode)."""
    from foodvision.features import load_index, open_split
    from foodvision.model import classifier_for
    from foodvision.spec import load_transform

    params = dataclasses.replace(project_params().train, epochs=3, batch_size=4, lr=0.01)
    cpu = torch.device("cpu")
    seed_everything(42)
    model, head = classifier_for("efficientnet_b0", trained.pretrained, 3, 0.2, seed=42)
    index = load_index(trained.features)
    loop = fit_images(model, head, index, load_transform(trained.transform), params, 42, cpu)
    w_loop = model.get_submodule(head)[1].weight.detach().clone()

    seed_everything(42)
    torch.manual_seed(42)
    net = new_head(index.feature_dim, 3, 0.2)
    fast = fit_features(net, FeatureRows(open_split(trained.features, index, "train")),
                        FeatureRows(open_split(trained.features, index, "test")), params, 42, cpu)
    for a, b in zip(fast, loop):
        for key in ("train_loss", "held_out_loss", "train_acc", "held_out_acc"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    assert torch.allclose(net[1].weight, w_loop, atol=1e-5)


def test_the_head_on_stored_features_gives_the_saved_models_logits_on_the_images(trained):
    """What evaluate computes from the files (the NumPy head) is what the checkpoint says about the images themselves."""
    from foodvision.checkpoint import head_logits, head_weights, read_checkpoint
    from foodvision.data import ImageSamples, build_transform
    from foodvision.features import load_index, open_split
    from foodvision.spec import load_transform

    index = load_index(trained.features)
    feats, labels = next(open_split(trained.features, index, "test").batches(100))
    from_files = torch.from_numpy(head_logits(feats, *head_weights(trained.model, read_checkpoint(trained.model))))
    model, _ = load_checkpoint(trained.model)
    transform = load_transform(trained.transform)
    images = ImageSamples(trained.raw, [{"path": p, "label": 0} for p in index.split("test").paths],
                          build_transform(transform), transform["resize_size"])
    batch = torch.stack([images[i][0] for i in range(len(images))])
    with torch.inference_mode():
        from_images = model(batch)
    assert len(from_files) == 6 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(from_files, from_images, atol=1e-4), (from_files - from_images).abs().max()


def stage_project(trained, folder, **train):
    """A folder whose params.yaml points the train stage at the tiny run's inputs."""
    import yaml
    from conftest import default_params_text, write_pipeline

    params = yaml.safe_load(default_params_text())
    params["train"].update(batch_size=4, **train)
    params["device"] = "cpu"
    paths = write_pipeline(folder)
    for key in ("features", "pretrained", "transform", "spec"):  # paths.* lie inside the project: links
        link = folder / paths[key]
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(getattr(trained, key))
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return {**params, "paths": paths}


def test_a_long_run_shows_progress_after_every_epoch(trained, tmp_path):
    """metrics/train.json and the history CSV appear while train runs, before the model does."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    params = stage_project(trained, tmp_path, epochs=100_000)
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages/train.py")], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / params["paths"]["train_metrics"]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and json.loads(metrics.read_text())["epoch"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "train still runs"
        epoch = json.loads(metrics.read_text())["epoch"]
        rows = list(csv.DictReader((tmp_path / params["paths"]["history"]).open()))
        assert epoch >= 2 and len(rows) >= epoch
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / params["paths"]["model"]).exists()


def test_two_runs_writing_the_same_outputs_both_finish(trained, tmp_path):
    """Cleanup of stale temporaries never removes the live ones of another run."""
    import subprocess
    import sys

    from conftest import ROOT

    params = stage_project(trained, tmp_path, epochs=60)
    runs = [subprocess.Popen([sys.executable, str(ROOT / "stages/train.py")], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    load_checkpoint(tmp_path / params["paths"]["model"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_train_without_augmentation_imports_no_torchvision():
    """Every stage pays its imports: a linear head on stored features needs torch alone."""
    import subprocess
    import sys

    code = "import sys, foodvision.train, foodvision.evaluate; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_our_adam_is_torchs_adam_to_the_bit_and_never_imports_dynamo():
    """The optimizer skips torch.optim.Optimizer (its methods import torch._dynamo, a second per train process)
    but must update the head exactly as torch.optim.Adam does."""
    import subprocess
    import sys

    import torch

    from foodvision.fit import Adam
    from foodvision.head import new_head

    def steps(make_optimizer) -> dict:
        torch.manual_seed(0)
        head = new_head(16, 3, 0.2)
        optimizer = make_optimizer(head.parameters())
        gen = torch.Generator().manual_seed(1)
        for _ in range(25):
            x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(head(x), y).backward()
            optimizer.step()
        return head.state_dict()

    ours, theirs = steps(lambda p: Adam(p, lr=0.01)), steps(lambda p: torch.optim.Adam(p, lr=0.01, fused=True))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs) and not torch.equal(ours["1.bias"], torch.zeros(3))
    code = ("import sys, torch; from foodvision.fit import Adam; p = torch.nn.Parameter(torch.ones(2)); "
            "o = Adam([p], 0.1); p.sum().backward(); o.step(); sys.exit('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_ctrl_c_is_one_line_exit_130_and_nothing_half_written(trained, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, ctrl_c_as_in_a_terminal

    params = stage_project(trained, tmp_path, epochs=100_000)
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / "train.py")], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ctrl_c_as_in_a_terminal)
    metrics = tmp_path / params["paths"]["train_metrics"]
    deadline = time.monotonic() + 120
    while not metrics.exists():  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / params["paths"]["model"]).exists()
    assert not list(tmp_path.rglob("*.tmp")), "no temporary left behind"
