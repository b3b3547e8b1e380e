import pytest
import torch
from conftest import save_with_hash_name

from foodvision.core.errors import ModelError
from foodvision.fetch import FetchError
from foodvision.model import build_backbone, resolve_weights
from foodvision.pretrained import fetch_pretrained
from foodvision.statedict import load_state_dict_file


def test_fetch_over_http_checks_hash_and_loads(server_url, backbone_file, tmp_path):
    dest = fetch_pretrained("efficientnet_b0", "DEFAULT", f"{server_url}/{backbone_file.name}", tmp_path / "b.pth", sha256=None)
    assert dest.read_bytes() == backbone_file.read_bytes()
    state = load_state_dict_file(dest)
    assert len(state) == len(build_backbone("efficientnet_b0").state_dict())


def test_default_source_is_torchvisions_published_url():
    member = resolve_weights("efficientnet_b0", "DEFAULT")
    assert member.url.endswith("efficientnet_b0_rwightman-7f5810bc.pth")


def test_hash_in_name_must_match(backbone_file, tmp_path):
    liar = tmp_path / "efficientnet_b0-0badc0de.pth"
    liar.write_bytes(backbone_file.read_bytes())
    with pytest.raises(FetchError, match="promises a hash starting 0badc0de"):
        fetch_pretrained("efficientnet_b0", "DEFAULT", liar.as_uri(), tmp_path / "b.pth", sha256=None)
    assert not (tmp_path / "b.pth").exists()


def test_weights_of_another_architecture_are_refused(served, server_url, tmp_path):
    other = save_with_hash_name(build_backbone("resnet18").state_dict(), served, "resnet18_test")
    with pytest.raises(ModelError, match="does not fit model.name 'efficientnet_b0'") as caught:
        fetch_pretrained("efficientnet_b0", "DEFAULT", f"{server_url}/{other.name}", tmp_path / "b.pth", sha256=None)
    assert str(caught.value).startswith(f"{server_url}/{other.name} does not fit"), "the user's file, by its URL"
    assert ".tmp" not in str(caught.value), "never our temporary copy"
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_default_source_names_the_backbone_that_needs_no_download(tmp_path, monkeypatch):
    """Offline, a torchvision backbone's own URL fails: the one line says which backbone works without it.
    (Its URL is pointed at a local port nothing listens on; the download itself is real.)"""
    import dataclasses

    from conftest import free_port

    import foodvision.pretrained

    closed = dataclasses.replace(resolve_weights("efficientnet_b0", "DEFAULT"),
                                 url=f"http://127.0.0.1:{free_port()}/efficientnet_b0_rwightman-7f5810bc.pth")
    monkeypatch.setattr(foodvision.pretrained, "resolve_weights", lambda name, weights: closed)
    with pytest.raises(FetchError, match=r"connection refused.*; or, offline, use model.name: efficientnet_lite0, "
                                         r"whose weights come with the setup$"):
        fetch_pretrained("efficientnet_b0", "DEFAULT", None, tmp_path / "b.pth", sha256=None)


def test_null_weights_write_a_reproducible_random_init(tmp_path):
    a = fetch_pretrained("resnet18", None, None, tmp_path / "a.pth", sha256=None)
    b = fetch_pretrained("resnet18", None, None, tmp_path / "b.pth", sha256=None)
    sa, sb = load_state_dict_file(a), load_state_dict_file(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_backbone_or_member_lists_accepted():
    with pytest.raises(ModelError, match="accepted: .*efficientnet_b0.*resnet50"):
        resolve_weights("efficientnet_b9", "DEFAULT")
    with pytest.raises(ModelError, match="accepted: DEFAULT, IMAGENET1K_V1, or null"):
        resolve_weights("efficientnet_b0", "IMAGENET21K")


def test_a_full_sha256_pins_the_mirrors_file(server_url, backbone_file, tmp_path):
    import hashlib

    digest = hashlib.sha256(backbone_file.read_bytes()).hexdigest()
    url = f"{server_url}/{backbone_file.name}"
    fetch_pretrained("efficientnet_b0", "DEFAULT", url, tmp_path / "b.pth", sha256=digest)
    with pytest.raises(FetchError, match=f"expected {'1' * 64}, got {digest}"):
        fetch_pretrained("efficientnet_b0", "DEFAULT", url, tmp_path / "c.pth", sha256="1" * 64)
    assert not (tmp_path / "c.pth").exists()
