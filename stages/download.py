"""DVC stage `download`: the dataset archive at data.url, checked and kept as one stored zip at paths.raw."""

from pathlib import Path

from foodvision.core.params import load_params, load_paths
from foodvision.core.stage import run
from foodvision.download import download_dataset
from foodvision.fetch import note_untracked


def main() -> None:
    params, paths = load_params(), load_paths()
    note_untracked(params.data.url, Path(paths.inputs_data), "data.url")
    download_dataset(params.data.url, Path(paths.raw), sha256=params.data.sha256,
                     content_sha256=params.data.content_sha256,
                     max_extract_mb=params.data.max_extract_mb, max_download_mb=params.data.max_download_mb)


if __name__ == "__main__":
    run(main, "download")
