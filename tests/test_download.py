import stat
import zipfile
from pathlib import Path

import pytest

from conftest import write_dataset, zip_dir
from foodvision.download import ArchiveError, download_dataset, extract_dataset


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_download_over_http_and_extract(server_url, dataset_zip, tmp_path):
    target = download_dataset(f"{server_url}/{dataset_zip.name}", tmp_path / "raw" / "food")
    files = files_under(target)
    assert len([f for f in files if f.endswith(".jpg")]) == 18
    assert "train/sushi/003.jpg" in files and "test/pizza/001.jpg" in files
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["food"], "no temp files left behind"


def test_sha256_mismatch_extracts_nothing(server_url, dataset_zip, tmp_path):
    with pytest.raises(Exception, match="sha256 mismatch"):
        download_dataset(f"{server_url}/{dataset_zip.name}", tmp_path / "raw" / "food", sha256="1" * 64)
    assert list((tmp_path / "raw").iterdir()) == []


def test_archive_with_a_top_folder(tmp_path):
    write_dataset(tmp_path / "src")
    archive = zip_dir(tmp_path / "src", tmp_path / "a.zip", prefix="pizza_steak_sushi/")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/pizza_steak_sushi/._x", b"junk")
    extract_dataset(archive, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]


def test_rerun_replaces_previous_extraction(tmp_path, dataset_zip):
    target = tmp_path / "out"
    (target / "train" / "stale").mkdir(parents=True)
    extract_dataset(dataset_zip, target)
    assert not (target / "train" / "stale").exists()


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
    target = tmp_path / "deep" / "out"
    with pytest.raises(ArchiveError, match=message):
        extract_dataset(archive, target)
    assert not target.exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "deep" / "escape.txt").exists()
    assert list((tmp_path / "deep").iterdir()) == []


def test_not_a_zip(tmp_path):
    page = tmp_path / "page.zip"
    page.write_text("<html>404 Not Found</html>")
    with pytest.raises(ArchiveError, match="is not a zip archive"):
        extract_dataset(page, tmp_path / "out")


def test_empty_and_layoutless_archives(tmp_path):
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(ArchiveError, match="is empty"):
        extract_dataset(empty, tmp_path / "out")
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("pizza/a.jpg", b"x")
    with pytest.raises(ArchiveError, match="no train/ and test/ folders"):
        extract_dataset(flat, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_get_the_usual_permissions(tmp_path, dataset_zip):
    from foodvision.atomic import write_text

    write_text(tmp_path / "a.txt", "x")
    extract_dataset(dataset_zip, tmp_path / "out")
    assert (tmp_path / "a.txt").stat().st_mode & 0o044 == 0o044, "readable by group and others"
    assert (tmp_path / "out").stat().st_mode & 0o055 == 0o055
