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


def test_a_llama_cpp_that_dies_of_a_signal_is_told_how_to_build_without_the_faulting_instructions(tmp_path,
                                                                                                 monkeypatch):
    """On the development VM llama.cpp's AMX kernels died of SIGILL: the script says so in one line with the flags that
    build without them, and a build with other --llama-cmake flags is not reused."""
    peers = _peers(monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "llama-greedy-ids"
    tool.write_text("#!/bin/sh\nkill -ILL $$\n")
    tool.chmod(0o755)
    with pytest.raises(SystemExit, match=r"died of signal 4\. .*--llama-cmake '-DGGML_NATIVE=OFF .*AMX_TILE=OFF"):
        peers.llama_greedy(bin_dir, tmp_path / "m.gguf", 0, 8)

    built = []

    def fake_run(cmd, log):  # a build that makes the binaries
        built.append(cmd)
        for name in peers.LLAMA_BINARIES:
            path = tmp_path / "llama.cpp" / "build-cpu" / "bin" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    (tmp_path / "llama.cpp").mkdir()
    monkeypatch.setattr(peers, "run_logged", fake_run)
    assert not peers.build_llama(tmp_path / "src.tgz", tmp_path, "90", want_cuda=False)["reused"]
    assert peers.build_llama(tmp_path / "src.tgz", tmp_path, "90", want_cuda=False)["reused"]
    again = peers.build_llama(tmp_path / "src.tgz", tmp_path, "90", want_cuda=False, extra=peers.PORTABLE_CPU)
    assert not again["reused"] and "-DGGML_AMX_INT8=OFF" in built[-2] and len(built) == 4
