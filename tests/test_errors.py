"""Bad input gets one clear FlashMoeError naming the problem; an interrupted conversion never loads, and resumes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file

import flashmoe
from flashmoe import convert as convert_module
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.store import MANIFEST, Store
from test_reference import PROMPT


@pytest.fixture
def ckpt(built, tmp_path):
    """A private copy of the tiny Qwen3.5 checkpoint that a test may damage."""
    return shutil.copytree(built.checkpoint("qwen3_5_moe"), tmp_path / "ckpt")


def shard_with(ckpt, name):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"][name]


def edit_tensors(ckpt, name, edit):
    """Rewrite the shard holding `name` after edit(tensors) changes its dict of tensors."""
    shard = shard_with(ckpt, name)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_source(tmp_path):
    with pytest.raises(FlashMoeError, match="is not a folder"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlashMoeError, match="has no config.json"):
        convert(tmp_path / "empty", tmp_path / "out")


def test_unsupported_architecture_lists_supported(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashMoeError, match=r"unsupported architecture.*LlamaForCausalLM.*Qwen3NextForCausalLM"):
        convert(ckpt, tmp_path / "out")


def test_missing_tensor_is_named(ckpt, tmp_path):
    name = "model.layers.2.mlp.shared_expert_gate.weight"
    edit_tensors(ckpt, name, lambda tensors: tensors.pop(name))
    with pytest.raises(FlashMoeError, match=f"missing tensor {name}"):
        convert(ckpt, tmp_path / "out")


def test_wrong_shape_is_named(ckpt, tmp_path):
    name = "model.layers.1.mlp.gate.weight"
    edit_tensors(ckpt, name, lambda tensors: tensors.update({name: tensors[name][:, :32].contiguous()}))
    with pytest.raises(FlashMoeError, match=rf"{name} has shape \[16, 32\] but config.json implies \[16, 64\]"):
        convert(ckpt, tmp_path / "out")


def test_missing_and_unreadable_shards(ckpt, tmp_path):
    victim = shard_with(ckpt, "model.norm.weight")
    victim.write_bytes(b"not a safetensors file")
    with pytest.raises(FlashMoeError, match=f"cannot read .*{victim.name}"):
        convert(ckpt, tmp_path / "out")
    victim.unlink()
    with pytest.raises(FlashMoeError, match=f"lists {victim.name}, which is missing"):
        convert(ckpt, tmp_path / "out")


def test_bad_quantization_options(ckpt, tmp_path):
    with pytest.raises(FlashMoeError, match="--bits must be one of"):
        convert(ckpt, tmp_path / "out", bits=3)
    with pytest.raises(FlashMoeError, match="does not divide"):
        convert(ckpt, tmp_path / "out", bits=4, group_size=48)


def test_not_enough_space_is_caught_before_writing(ckpt, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(FlashMoeError, match="not enough space .* GB is free"):
        convert(ckpt, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_interrupted_conversion_never_loads_and_resumes(built, ckpt, tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, []

    def disk_fills_up(fd):  # the third expert file hits a full disk
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(convert_module.os, "fsync", disk_fills_up)
    out = tmp_path / "out"
    with pytest.raises(FlashMoeError, match="no space left on device .* run the same flashmoe convert command again"):
        convert(ckpt, out, bits=4)
    with pytest.raises(FlashMoeError, match="not a complete flashmoe store.*interrupted conversion"):
        flashmoe.load(out)
    with pytest.raises(FlashMoeError, match="interrupted conversion with other options"):
        convert(ckpt, out, bits=8)

    monkeypatch.setattr(convert_module.os, "fsync", real_fsync)
    written = []
    monkeypatch.setattr(convert_module, "expert_tensors",
                        lambda *a, _real=convert_module.expert_tensors: written.append(1) or _real(*a))
    convert(ckpt, out, bits=4)  # resumes: layers 0 and 1 are not redone
    num_experts = Store(out).config.num_experts
    assert len(written) == 2 * num_experts  # the two unfinished layers (the blob layout comes from the config)
    resumed = flashmoe.load(out).logits(PROMPT)
    fresh = flashmoe.load(built.store("qwen3_5_moe", 4)).logits(PROMPT)
    assert torch.equal(resumed, fresh)
    with pytest.raises(FlashMoeError, match="already holds a complete flashmoe store"):
        convert(ckpt, out, bits=4)


def test_non_empty_destination_is_refused(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FlashMoeError, match="exists and is not empty"):
        convert(ckpt, out)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.fixture
def store_copy(built, tmp_path):
    return shutil.copytree(built.store("qwen3_5_moe", 4), tmp_path / "store")


def test_store_errors(store_copy, tmp_path):
    with pytest.raises(FlashMoeError, match="does not exist"):
        flashmoe.load(tmp_path / "nothing")
    expert_file = store_copy / "experts" / "layer_001.bin"
    with open(expert_file, "r+b") as f:
        f.truncate(expert_file.stat().st_size - 5000)
    with pytest.raises(FlashMoeError, match="corrupt store: experts/layer_001.bin is .* bytes but layer 1"):
        flashmoe.load(store_copy)
    expert_file.unlink()
    with pytest.raises(FlashMoeError, match="layer_001.bin \\(layer 1\\) is missing"):
        flashmoe.load(store_copy)


def test_newer_format_version_is_refused(store_copy):
    manifest = json.loads((store_copy / MANIFEST).read_text())
    manifest["format_version"] = 99
    (store_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FlashMoeError, match="format version 99 is not supported"):
        flashmoe.load(store_copy)


def test_flipped_byte_fails_checksum(store_copy):
    loc = Store(store_copy).expert_location(2, 5)
    with open(loc.path, "r+b") as f:
        f.seek(loc.offset + 100)
        byte = f.read(1)
        f.seek(loc.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = Store(store_copy).verify()
    assert len(problems) == 1 and problems[0].startswith("layer 2 expert 5: checksum")
    assert problems[0].endswith(f"manifest says {loc.crc32:08x}")
    model = flashmoe.load(store_copy, cache_gb=0, verify_reads=True)
    fetcher = model.fetcher
    clean = fetcher.start(1, list(range(16)))
    assert len(list(fetcher.arrivals(clean))) == 16  # a clean layer reads fine
    fetcher.finish(clean)
    with pytest.raises(FlashMoeError, match="layer 2 expert 5 fails its checksum"):
        list(fetcher.arrivals(fetcher.start(2, list(range(16)))))
    assert (2, 5) not in fetcher.ram  # the bad blob is not served from the cache later
    model.close()


def test_bad_generation_arguments(built):
    model = flashmoe.load(built.store("qwen3_5_moe", 4))
    with pytest.raises(FlashMoeError, match="outside the vocabulary"):
        model.logits([1, 2, 10**6])
    with pytest.raises(FlashMoeError, match="no tokens"):
        model.logits([])
    with pytest.raises(FlashMoeError, match="top_p"):
        list(model.generate([1, 2], 3, top_p=0))
    with pytest.raises(FlashMoeError, match="experts_per_token must be between 1 and 16"):
        flashmoe.load(built.store("qwen3_5_moe", 4), experts_per_token=17)


def test_bad_cache_options(built):
    store = built.store("qwen3_5_moe", 4)
    with pytest.raises(FlashMoeError, match="cache_gb must be >= 0, not -1"):
        flashmoe.load(store, cache_gb=-1)
    with pytest.raises(FlashMoeError, match="vram_cache_gb must be >= 0"):
        flashmoe.load(store, device="cuda" if torch.cuda.is_available() else "cpu", vram_cache_gb=-2)
    with pytest.raises(FlashMoeError, match="vram_cache_gb needs device='cuda'"):
        flashmoe.load(store, vram_cache_gb=1)


@pytest.mark.gpu
def test_on_the_gpu_a_vram_cache_larger_than_free_vram_is_refused_before_anything_is_allocated(built, monkeypatch):
    """The VRAM tier is checked against what the driver says is free before its slab is allocated: one line naming
    vram_cache_gb and what would fit (the tiny model's experts fit any real GPU, so the driver is made to say 1 MB)."""
    from flashmoe.experts import ExpertFetcher
    from flashmoe.store import Store

    store = Store(built.store("qwen3_5_moe", 4))
    total = torch.cuda.mem_get_info()[1]
    allocated = torch.cuda.memory_allocated()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, total))
    with pytest.raises(FlashMoeError, match=r"vram_cache_gb asks for .* GB of VRAM for experts, but 0\.0 GB is free; "
                                            r"pass at most vram_cache_gb=0\.0"):
        ExpertFetcher(store, torch.device("cuda"), ram_cache_bytes=0, vram_cache_bytes=store.expert_bytes)
    assert torch.cuda.memory_allocated() == allocated
