"""Committed files read the same in any clone: no absolute path of the checkout they were written in."""
import subprocess
from pathlib import Path

import pytest

from attnlab.files import portable_path

ROOT = Path(__file__).resolve().parents[1]
BINARY = {".png", ".jpg", ".jpeg", ".pt", ".onnx", ".gz", ".whl"}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_committed_text_file_holds_this_checkouts_absolute_path():
    needles = [str(ROOT) + "/", str(ROOT.parent / "shared") + "/"]
    found = []
    for path in _tracked():
        if path.suffix.lower() in BINARY or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        found += [f"{path.relative_to(ROOT)}: {n}" for n in needles if n in text]
    assert not found, "absolute paths in committed files (write them relative to the repository):\n" + "\n".join(found)


def test_portable_path_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "m" / "none-s0") == "runs/m/none-s0"
    assert portable_path("runs/x") == "runs/x"
    outside = tmp_path.parent / "elsewhere"
    assert portable_path(outside) == str(outside)
