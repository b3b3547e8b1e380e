"""requirements.lock: the one setup command installs it on Linux (x86_64, aarch64), macOS (Apple silicon) and
Windows (x86_64) with Python 3.11-3.13, hash-checked, with CUDA packages only on Linux (docs/platforms.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYTHONS = ("3.11", "3.12", "3.13")
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
# uv's --python-platform names of the covered machines -> the marker values pip evaluates there
PLATFORMS = {
    "x86_64-manylinux_2_28": {**LINUX, "platform_machine": "x86_64"},  # torch's Linux wheels need glibc 2.28
    "aarch64-manylinux_2_28": {**LINUX, "platform_machine": "aarch64"},
    "aarch64-apple-darwin": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    "x86_64-pc-windows-msvc": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"},
}
TARGETS = [(platform, python) for platform in PLATFORMS for python in PYTHONS]
# machines the lock does not cover, where a CUDA package must not be selected either (none exist there)
ELSEWHERE = {
    "x86_64-apple-darwin": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64", "os_name": "posix"},
    "aarch64-pc-windows-msvc": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "ARM64", "os_name": "nt"},
}
CUDA_ONLY = re.compile(r"nvidia-|cuda-|triton$")  # torch's Linux wheels pull these in; no macOS or Windows wheels


class Pin(NamedTuple):
    name: str
    version: str
    marker: Marker | None
    hashes: list[str]


@cache
def pins() -> tuple[Pin, ...]:
    """Each `name==version [; marker]` of the lock with its --hash lines (uv may pin a package once per marker)."""
    text = LOCK.read_text()
    found = []
    for block in re.split(r"\n(?=\S)", text):
        head = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?: ; ([^\\\n]+?))? *\\?$", block.split("\n")[0])
        if head:
            marker = Marker(head[3]) if head[3] else None
            found.append(Pin(canonicalize_name(head[1]), head[2], marker, re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    assert len(found) == len(re.findall(r"^\S+==", text, flags=re.M)), "a pin line of requirements.lock did not parse"
    return tuple(found)


def environment(markers: dict[str, str], python: str) -> dict[str, str]:
    return {**markers, "python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "extra": ""}


def selected(markers: dict[str, str], python: str) -> list[Pin]:
    """The pins pip installs on that machine: those whose marker holds there."""
    env = environment(markers, python)
    return [pin for pin in pins() if pin.marker is None or pin.marker.evaluate(env)]


def test_the_lock_pins_every_dependency_with_hashes():
    """The README's setup installs from requirements.lock: on each covered platform and Python, one exact version of
    every dependency, in its pyproject.toml range, each with sha256 hashes (pip --require-hashes), torch as pinned."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]]
    assert pins() and all(pin.hashes for pin in pins()), "a pin of requirements.lock has no --hash"
    for platform, python in TARGETS:
        chosen = selected(PLATFORMS[platform], python)
        twice = sorted({pin.name for pin in chosen if [p.name for p in chosen].count(pin.name) > 1})
        assert not twice, f"{platform}, Python {python}: two pins of {twice} apply at once"
        version = {pin.name: pin.version for pin in chosen}
        for requirement in wanted:
            if requirement.marker and not requirement.marker.evaluate(environment(PLATFORMS[platform], python)):
                continue  # pyproject.toml asks for it elsewhere only (openvino: x86 machines)
            name = canonicalize_name(requirement.name)
            assert name in version, f"{name} is not pinned for {platform}, Python {python} in requirements.lock"
            assert requirement.specifier.contains(version[name], prereleases=True), (
                f"requirements.lock pins {name}=={version[name]}, outside pyproject.toml's {requirement}: regenerate it"
            )
        assert version["torch"] == "2.14.1" and version["torchvision"] == "0.29.1", (platform, python)


def test_cuda_packages_install_only_on_linux():
    """A Mac or Windows install skips every CUDA package (they have no wheels there: pip would stop at the first), and
    a Linux x86_64 or aarch64 install gets them all, as torch's CUDA build needs."""
    cuda = {pin.name for pin in pins() if CUDA_ONLY.match(pin.name)}
    assert {"cuda-bindings", "nvidia-cudnn-cu13", "triton"} <= cuda, "torch's CUDA dependencies are missing"
    for python in PYTHONS:
        for platform, markers in {**PLATFORMS, **ELSEWHERE}.items():
            got = {pin.name for pin in selected(markers, python)} & cuda
            expected = cuda if markers["sys_platform"] == "linux" else set()
            assert got == expected, f"{platform}, Python {python}: CUDA packages {sorted(got ^ expected)} wrongly (not) selected"


def test_the_regenerate_command_in_the_docs_is_the_one_that_wrote_the_lock():
    """docs/platforms.md tells how to regenerate the lock: that command, run again, writes this lock (same options)."""
    header = re.search(r"^#\s+(uv pip compile .+)$", LOCK.read_text(), flags=re.M)
    assert header, "requirements.lock's header does not name the uv command that wrote it"
    assert "--universal" in header[1] and "--generate-hashes" in header[1]
    assert header[1] in (ROOT / "docs" / "platforms.md").read_text()


@cache
def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request("https://pypi.org/simple/torch/", method="HEAD"), timeout=10):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def uv() -> str:
    found = shutil.which("uv", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        pytest.skip("uv is not installed (it is in the dev extra): the lock's dry run for other platforms needs it")
    if not pypi_reachable():
        pytest.skip("PyPI cannot be reached: the lock's dry run for other platforms reads its index")
    return found


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_lock_installs_on_every_covered_platform(uv, platform, python, tmp_path):
    """The README's `pip install --require-hashes -r requirements.lock`, resolved for another machine: uv evaluates
    the lock's markers for that platform and Python and finds a wheel of each selected pin on PyPI (nothing is
    downloaded; pip's own --platform would evaluate markers for this machine instead)."""
    command = [uv, "pip", "install", "--dry-run", "--no-config", "--no-python-downloads", "--no-progress",
               "--color", "never", "--python", sys.executable, "--python-platform", platform, "--python-version", python,
               "--target", str(tmp_path / "site-packages"), "--no-deps", "--require-hashes", "-r", str(LOCK)]
    # torch 2.14.1 and onnxruntime ship Apple-silicon wheels for macOS 14 and newer only (uv assumes 13 otherwise)
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    if result.returncode and re.search(r"error sending request|dns error|tcp connect|timed out", result.stderr, re.I):
        pytest.skip(f"PyPI went unreachable during the dry run: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, f"{platform}, Python {python}:\n{result.stderr[-3000:]}"
    count = re.search(r"Would install (\d+) packages?", result.stderr)
    assert count, result.stderr[-3000:]
    assert int(count[1]) == len(selected(PLATFORMS[platform], python)), "uv and the lock's markers disagree on what installs"
