"""benchmarks/peers.py's own checks that run without llama.cpp."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _peers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("peers", BENCHMARKS / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "peers", peers)  # its dataclasses look their module up
    spec.loader.exec_module(peers)
    return peers


def test_a_full_disk_is_named_before_llama_quantize_meets_it(tmp_path, monkeypatch):
    """llama-quantize on a full disk says only 'basic_ios::clear: iostream error': the script stops first, in a line
    that names the space needed and free."""
    peers = _peers(monkeypatch)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\0" * 10_000_000)  # 0.01 GB of bf16
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1e12, 1e12, 12_000_000))  # room for a Q8_0, not Q4_0
    with pytest.raises(SystemExit, match=r"converting for llama.cpp needs about 0.0 GB under .*, which has 0.0 GB free"):
        peers.convert_gguf(tmp_path, ckpt, tmp_path / "m.gguf", 4, tmp_path)
    peers.need_space(tmp_path, 0.0105, "a Q8_0")  # fits: no exit
