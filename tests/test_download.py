import stat
import zipfile
from pathlib import Path

import pytest
from conftest import download, prepare_spec, store, stored, write_dataset, zip_dir

from foodvision.core.errors import DatasetError
from foodvision.download import ArchiveError
from foodvision.prepare import dataset_root
from foodvision.store import ImageStore, Tree


def files_under(store: Path) -> list[str]:
    return ImageStore(store).names()


def test_download_over_http_and_store(server_url, dataset_zip, tmp_path):
    target = download(f"{server_url}/{dataset_zip.name}", tmp_path / "raw" / "food.zip")
    files = files_under(target)
    assert len([f for f in files if f.endswith(".jpg")]) == 18
    assert "train/sushi/003.jpg" in files and "test/pizza/001.jpg" in files
    with zipfile.ZipFile(target) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert zf.read("train/sushi/003.jpg") == zipfile.ZipFile(dataset_zip).read("train/sushi/003.jpg")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["food.zip"], "no temp files left behind"
    again = download(f"{server_url}/{dataset_zip.name}", tmp_path / "again.zip")
    assert again.read_bytes() == target.read_bytes(), "the same archive, the same bytes"


def test_sha256_mismatch_extracts_nothing(server_url, dataset_zip, tmp_path):
    with pytest.raises(Exception, match="sha256 mismatch"):
        download(f"{server_url}/{dataset_zip.name}", tmp_path / "raw" / "food.zip", sha256="1" * 64)
    assert list((tmp_path / "raw").iterdir()) == []


def test_archive_with_a_top_folder(tmp_path):
    write_dataset(tmp_path / "src")
    archive = zip_dir(tmp_path / "src", tmp_path / "a.zip", prefix="pizza_steak_sushi/")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/pizza_steak_sushi/._x", b"junk")
    store(archive, tmp_path / "out.zip")
    names = files_under(tmp_path / "out.zip")
    assert names[0].startswith("pizza_steak_sushi/") and not any("__MACOSX" in n for n in names), "kept as it is"
    assert dataset_root(Tree(names)) == "pizza_steak_sushi"
    spec = prepare_spec(tmp_path / "out.zip", tmp_path / "spec.json")
    assert spec["splits"]["test"][0]["path"] == "pizza_steak_sushi/test/pizza/000.jpg"


def test_rerun_replaces_the_previous_store(tmp_path, dataset_zip):
    target = tmp_path / "out.zip"
    target.write_bytes(b"a half-written store from a killed run")
    store(dataset_zip, target)
    assert "train/sushi/003.jpg" in files_under(target)


def evil_zip(path: Path, name: str, *, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/pizza/a.jpg", b"x")
        zf.writestr("test/pizza/a.jpg", b"x")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if symlink else b"owned")
    return path


@pytest.mark.parametrize(("member", "symlink", "message"), [
    ("../escape.txt", False, "would extract outside"),
    ("train/../../escape.txt", False, "would extract outside"),
    ("/tmp/escape.txt", False, "would extract outside"),
    ("train/pizza/link.jpg", True, "symbolic link"),
])
def test_escaping_members_are_refused(tmp_path, member, symlink, message):
    archive = evil_zip(tmp_path / "evil.zip", member, symlink=symlink)
    target = tmp_path / "deep" / "out.zip"
    with pytest.raises(ArchiveError, match=message):
        store(archive, target)
    assert not target.exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "deep" / "escape.txt").exists()
    assert not (tmp_path / "deep").exists() or list((tmp_path / "deep").iterdir()) == []


def test_not_a_zip(tmp_path):
    page = tmp_path / "page.zip"
    page.write_text("<html>404 Not Found</html>")
    with pytest.raises(ArchiveError, match="is not a zip or tar archive"):
        store(page, tmp_path / "out.zip")


def test_empty_and_layoutless_archives(tmp_path):
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(ArchiveError, match="is empty"):
        store(empty, tmp_path / "out.zip")
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("pizza/a.jpg", b"x")
    assert not (tmp_path / "out.zip").exists()
    store(flat, tmp_path / "out.zip")
    with pytest.raises(DatasetError, match="holds 0 class folder.*expected train/<class>/"):
        prepare_spec(tmp_path / "out.zip", tmp_path / "spec.json")


def test_outputs_get_the_usual_permissions(tmp_path, dataset_zip):
    from foodvision.core.files import write_text

    write_text(tmp_path / "a.txt", "x")
    store(dataset_zip, tmp_path / "out.zip")
    assert (tmp_path / "a.txt").stat().st_mode & 0o044 == 0o044, "readable by group and others"
    assert (tmp_path / "out.zip").stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_archives_extract_like_zips(tmp_path, mode):
    import tarfile

    write_dataset(tmp_path / "src")
    archive = tmp_path / ("food.tar" if mode == "w" else "food.tgz")
    with tarfile.open(archive, mode) as tf:
        tf.add(tmp_path / "src", arcname="food")
    store(archive, tmp_path / "out.zip")
    assert "food/train/sushi/003.jpg" in files_under(tmp_path / "out.zip")
    assert prepare_spec(tmp_path / "out.zip", tmp_path / "spec.json")["counts"]["test"]["pizza"] == 2


@pytest.mark.parametrize(("kind", "message"), [("..", "would extract outside"), ("abs", "would extract outside"),
                                               ("sym", "is a link"), ("hard", "is a link"), ("fifo", "not a file")])
def test_escaping_tar_members_are_refused(tmp_path, kind, message):
    import io
    import tarfile

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        ok = tarfile.TarInfo("train/pizza/a.jpg")
        ok.size = 1
        tf.addfile(ok, io.BytesIO(b"x"))
        info = tarfile.TarInfo({"..": "../escape.txt", "abs": "/tmp/escape.txt"}.get(kind, "train/pizza/b.jpg"))
        if kind == "sym":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hard":
            info.type, info.linkname = tarfile.LNKTYPE, "train/pizza/a.jpg"
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        info.size = 0 if kind in ("sym", "hard", "fifo") else 5
        tf.addfile(info, io.BytesIO(b"owned") if info.size else None)
    with pytest.raises(ArchiveError, match=message):
        store(archive, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists() and not (tmp_path / "escape.txt").exists()


def test_tar_bomb_is_refused(tmp_path):
    import io
    import tarfile

    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("train/a/x.jpg")
        info.size = 3 * 2**20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(ArchiveError, match=r"inflate to 3 MB, over data.max_extract_mb \(2 MB\)"):
        store(archive, tmp_path / "out.zip", max_bytes=2 * 2**20)
    assert not (tmp_path / "out.zip").exists()


def zip_with(path: Path, *members: tuple[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members:
            zf.writestr(member, data)
    return path


def patch_last_member(archive: Path, *, flags: int = 0, method: int | None = None,
                      name: tuple[bytes, bytes] | None = None) -> Path:
    """Edit the last member's local and central headers: what zipfile itself refuses to write."""
    data = bytearray(archive.read_bytes())
    for signature, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.rfind(signature)
        value = int.from_bytes(data[at + flags_at:at + flags_at + 2], "little") | flags
        data[at + flags_at:at + flags_at + 2] = value.to_bytes(2, "little")
        if method is not None:
            data[at + method_at:at + method_at + 2] = method.to_bytes(2, "little")
    if name is not None:
        assert len(name[0]) == len(name[1])
        data = bytearray(bytes(data).replace(name[0], name[1]))
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile's own, while this test writes the duplicate
def test_odd_zips_are_one_line_errors(tmp_path):
    """Encrypted, Deflate64, a bad UTF-8 flag, a file that is also a folder, a 300-byte name, duplicates, case."""
    ok = ("train/pizza/a.jpg", b"x")
    two = [ok, ("train/pizza/b.jpg", b"x")]
    cases = {
        "encrypted": (two, {"flags": 0x1}, "'train/pizza/b.jpg' is encrypted"),
        "deflate64": (two, {"method": 9}, r"compression method 9 \(Deflate64, what Windows Explorer writes"),
        "bad-utf8": (two, {"flags": 0x800, "name": (b"b.jpg", b"\xff.jpg")}, "flagged as UTF-8 that is not"),
        "file-and-folder": ([ok, ("train/pizza", b"x")], {}, "'train/pizza' is both a file and a folder"),
        "long-name": ([ok, ("train/pizza/" + "x" * 300 + ".jpg", b"x")], {}, "has a name over 255 bytes"),
        "duplicate": ([ok, ok], {}, "holds 'train/pizza/a.jpg' twice"),
        "case": ([ok, ("train/Pizza/b.jpg", b"x")], {}, "'train/Pizza' and 'train/pizza' differ only in case"),
        # a newline would split the stages' printed lines (a forged result line); Windows holds none of the rest
        "newline": ([ok, ("train/pizza/evil\nname.jpg", b"x")], {}, r"'train/pizza/evil\\nname.jpg' has a control"),
        "tab": ([ok, ("train/pi\tzza/b.jpg", b"x")], {}, "has a control character"),
        "escape": ([ok, ("train/pizza/\x1b[2Jb.jpg", b"x")], {}, "has a control character"),
        "angle": ([ok, ("train/pizza/<b>.jpg", b"x")], {}, "has a name Windows cannot hold"),
        "trailing-dot": ([ok, ("train/pizza./b.jpg", b"x")], {}, "'train/pizza.' has a name Windows cannot hold"),
        "reserved": ([ok, ("train/pizza/CON.jpg", b"x")], {}, "'train/pizza/CON.jpg' has a name Windows cannot"),
    }
    for label, (members, patch, message) in cases.items():
        archive = zip_with(tmp_path / f"{label}.zip", *members)
        if patch:
            patch_last_member(archive, **patch)
        with pytest.raises(ArchiveError, match=message) as raised:
            store(archive, tmp_path / "out.zip")
        assert "\n" not in str(raised.value), label
        assert not (tmp_path / "out.zip").exists(), label


def test_unflagged_utf8_names_are_read_as_utf8(tmp_path):
    """Many zip tools write UTF-8 names without the flag: `寿司`, not cp437's `Ä⌡Äi`."""
    sushi = "寿司".encode()
    archive = zip_with(tmp_path / "a.zip", ("train/" + "x" * len(sushi) + "/a.jpg", b"x"))
    patch_last_member(archive, name=(b"x" * len(sushi), sushi))
    store(archive, tmp_path / "out.zip")
    assert files_under(tmp_path / "out.zip") == ["train/寿司/a.jpg"]


def test_windows_separators_and_a_readme_beside_the_top_folder(tmp_path):
    write_dataset(tmp_path / "src")
    archive = tmp_path / "win.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "src").rglob("*.jpg")):
            zf.write(path, "food\\" + str(path.relative_to(tmp_path / "src")).replace("/", "\\"))
        zf.writestr("README.txt", b"photos of food")
    store(archive, tmp_path / "out.zip")
    spec = prepare_spec(tmp_path / "out.zip", tmp_path / "spec.json")
    assert spec["layout"] == "train/test" and spec["counts"]["train"]["pizza"] == 4


def test_hidden_class_folders_are_reported(tmp_path):
    write_dataset(tmp_path / "raw")
    (tmp_path / "raw" / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "raw" / "train" / ".ipynb_checkpoints" / "a.jpg").write_bytes(b"x")
    spec = prepare_spec(stored(tmp_path / "raw", tmp_path / "raw.zip"), tmp_path / "spec.json")
    assert spec["ignored_folders"] == [".ipynb_checkpoints"] and len(spec["classes"]) == 3


def test_the_member_count_is_capped(tmp_path, monkeypatch):
    import foodvision.download

    monkeypatch.setattr(foodvision.download, "MAX_MEMBERS", 100)
    archive = zip_with(tmp_path / "many.zip", *[(f"train/pizza/{i}.jpg", b"") for i in range(101)])
    with pytest.raises(ArchiveError, match="holds 101 members, over the 100 this pipeline extracts"):
        store(archive, tmp_path / "out.zip")


def test_the_content_digest_survives_re_zipping_and_catches_a_changed_image(tmp_path):
    write_dataset(tmp_path / "src")
    first = zip_dir(tmp_path / "src", tmp_path / "a.zip")
    digest = store(first, tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "b.zip", "w", zipfile.ZIP_DEFLATED) as zf:  # other order, compression, top folder
        for path in sorted((tmp_path / "src").rglob("*"), reverse=True):
            if path.is_file():
                zf.write(path, "wrapped/" + path.relative_to(tmp_path / "src").as_posix())
    assert (tmp_path / "b.zip").read_bytes() != first.read_bytes()
    assert store(tmp_path / "b.zip", tmp_path / "out.zip", content_sha256=digest) == digest
    (tmp_path / "src" / "test" / "sushi" / "001.jpg").write_bytes(b"another photo")
    changed = zip_dir(tmp_path / "src", tmp_path / "c.zip")
    with pytest.raises(ArchiveError, match=f"holds other images than data.content_sha256 pins: expected {digest}"):
        store(changed, tmp_path / "out2.zip", content_sha256=digest)
    assert not (tmp_path / "out2.zip").exists()


def test_the_articles_images_match_the_pinned_digest(shared_data, tmp_path):
    import yaml
    from conftest import default_params_text

    pinned = yaml.safe_load(default_params_text())["data"]["content_sha256"]
    assert store(shared_data / "pizza_steak_sushi.zip", tmp_path / "out.zip", content_sha256=pinned) == pinned


def test_a_member_is_read_at_its_recorded_location_without_the_zips_directory(tmp_path):
    """export and predict read a few test images at the locations prepare recorded: no parse of the whole
    central directory (167 ms at 30,000 images), and a wrong location is a one-line error, never other bytes."""
    from foodvision.store import StoreError, write_store

    target = tmp_path / "store.zip"
    write_store(target, [("a/pizza.jpg", [b"x" * 1000]), ("b/sushi ü.jpg", [b"y" * 3000])])
    where = ImageStore(target).locations()
    data = target.read_bytes()
    directory = data.index(b"PK\x01\x02")
    target.write_bytes(data[:directory] + b"\0" * (len(data) - directory))  # the directory gone, members intact
    with pytest.raises(StoreError):
        ImageStore(target).read("a/pizza.jpg")
    store = ImageStore(target)
    assert store.read_at("b/sushi ü.jpg", where["b/sushi ü.jpg"]).read() == b"y" * 3000
    offset, _, crc = where["b/sushi ü.jpg"]
    for wrong in (where["a/pizza.jpg"], (offset, 3000, 0), (10**9, 3000, crc), (offset, 10**12, crc)):
        with pytest.raises(StoreError, match=r"store.zip does not hold 'b/sushi ü.jpg' where the spec says; run "
                                             r"`dvc repro prepare`"):
            store.read_at("b/sushi ü.jpg", wrong)


def test_a_tar_member_whose_name_is_not_utf8_is_one_line(tmp_path):
    """tarfile hands such a name over with surrogate escapes, which would fail in a traceback where it is printed
    or written: the archive is refused in one line naming the member."""
    import io
    import tarfile

    archive = tmp_path / "odd.tar"
    with tarfile.open(archive, "w", encoding="utf-8", errors="surrogateescape") as tf:
        for name in ("train/pizza/a.jpg", "train/pizza/\udcff.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArchiveError, match=r"odd.tar: member 'train/pizza/\\udcff.jpg' has a name that is not UTF-8"):
        store(archive, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()
