"""`pip install .` installs the one import package `labtwin` and its data files, nothing beside it.

The wheel is what pip installs, so its file list is the test: built from a copy of the repository (a build
writes build/ and *.egg-info into the tree it builds, which other sessions are using) as a user's `pip install .`
builds it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", "labtwin-data", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".*_cache"
)
# The files the code opens at run time from its own package, not imported: a wheel without them installs and fails.
DATA_FILES = [
    "labtwin/physics/cells/*.yaml",
    "labtwin/protocols/library/*.yaml",
    "labtwin/config/lab.yaml",
    "labtwin/data/migrations/**/*",
]


def source_files(root: Path, pattern: str) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.glob(pattern)
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The source tree it was built from, and the wheel's files by name (with their contents)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(work / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = (work / "dist").glob("labtwin-*.whl")
    with zipfile.ZipFile(path) as archive:
        return src, {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.slow
def test_the_wheel_installs_only_the_labtwin_package_and_its_metadata(wheel):
    src, names = wheel
    top = {name.split("/")[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"labtwin"}, sorted(top)
    assert len(dist_info) == 1 and dist_info.pop().startswith("labtwin-")
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert names[top_level].decode().split() == ["labtwin"]
    # Everything under labtwin/ is a file of the source package: no tests, benches or build leftovers.
    packaged = {n for n in names if n.startswith("labtwin/")}
    assert packaged <= source_files(src, "labtwin/**/*"), sorted(packaged - source_files(src, "labtwin/**/*"))
    assert source_files(src, "labtwin/**/*.py") <= packaged, sorted(source_files(src, "labtwin/**/*.py") - packaged)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", DATA_FILES)
def test_the_wheel_carries_the_data_files_the_code_opens(wheel, pattern):
    src, names = wheel
    wanted = source_files(src, pattern)
    assert wanted, f"the source has no {pattern}: the pattern is stale"
    assert wanted <= set(names), sorted(wanted - set(names))
