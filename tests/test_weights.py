"""``python -m study.weights``: the listing, the dry-run table and downloads (network faked)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from foundation.errors import UserError
from study.weights import download_checkpoint, main, weights_table
from trainables.backbones import BACKBONES, get_spec

REPO = Path(__file__).resolve().parents[1]


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def serving(payload: bytes, seen: list | None = None):
    def open_url(url, timeout):
        if seen is not None:
            seen.append(url)
        return FakeResponse(payload)

    return open_url


def offline(url, timeout):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_weights_table_reports_presence_overrides_and_the_packaged_model(tmp_path):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    own = tmp_path / "own.pt"
    own.write_bytes(b"x")
    files = {"sam2_l": str(own), "sam_h": "random", "sam_l": tmp_path / "gone.pt"}
    rows = {row["name"]: row for row in weights_table(tmp_path, files)}
    assert list(rows) == list(BACKBONES)
    assert rows["sam_b"] == {
        "name": "sam_b",
        "file": str(tmp_path / "sam_vit_b_01ec64.pth"),
        "present": True,
        "source": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "format": "state_dict",
        "status": "present",
    }
    assert rows["sam2_t"]["present"] is False and rows["sam2_t"]["status"] == "missing"
    assert rows["sam2_l"]["file"] == str(own) and rows["sam2_l"]["present"] is True
    assert rows["sam_h"]["status"] == "random" and rows["sam_h"]["present"] is True
    assert rows["sam_l"]["present"] is False
    assert rows["litemedsam"]["status"] == "packaged" and rows["litemedsam"]["present"] is True
    assert rows["microsam_b"]["format"] == "micro_sam"


def test_listing_command_prints_every_backbone(tmp_path, capsys):
    assert main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name, entry in BACKBONES.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert entry.spec.source_url in line and entry.spec.format in line
        assert ("packaged" if name == "litemedsam" else "missing") in line
    assert str(tmp_path) in out


def test_download_writes_atomically_and_checks_the_sha256(tmp_path):
    payload = b"checkpoint bytes"
    seen: list[str] = []
    spec = get_spec("sam2_t")  # no official checksum
    path = download_checkpoint(spec, tmp_path, open_url=serving(payload, seen), progress=False)
    assert path == tmp_path / "sam2.1_hiera_tiny.pt" and path.read_bytes() == payload
    assert seen == [spec.download_url]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam2.1_hiera_tiny.pt"]

    checked = dataclasses.replace(get_spec("sam_b"), sha256=hashlib.sha256(payload).hexdigest())
    assert download_checkpoint(checked, tmp_path, open_url=serving(payload), progress=False).read_bytes() == payload

    with pytest.raises(UserError, match="sha256 .* is not the official .*discarded"):
        download_checkpoint(get_spec("sam_l"), tmp_path, open_url=serving(b"something else"), progress=False)
    assert not (tmp_path / "sam_vit_l_0b3195.pth").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_offline_download_is_one_clear_paragraph(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", offline)
    assert main(["--dir", str(tmp_path), "--download", "sam_b"]) == 2
    err = capsys.readouterr().err
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in err
    assert "place the file manually" in err and str(tmp_path / "sam_vit_b_01ec64.pth") in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_download_refusals(tmp_path, capsys):
    with pytest.raises(UserError, match=r"no direct download link.*drive\.google\.com.*medsam_vit_b\.pth"):
        download_checkpoint(get_spec("medsam"), tmp_path, open_url=offline)
    with pytest.raises(UserError, match="packaged"):
        download_checkpoint(get_spec("litemedsam"), tmp_path, open_url=offline)
    assert main(["--dir", str(tmp_path), "--download", "sam_xl"]) == 2
    assert "Unknown backbone 'sam_xl'" in capsys.readouterr().err


def test_module_runs_as_a_command(tmp_path):
    command = [sys.executable, "-m", "study.weights", "--dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "litemedsam" in result.stdout and "sam2.1_hiera_large.pt" in result.stdout
