"""Converting straight from the Hub: a local server stands in for huggingface.co (HF_ENDPOINT), serving the tiny
sharded checkpoint the way the Hub does; the conversion downloads shard by shard, deletes each when done, survives a
dropped connection and an interruption, and gives the store converting the folder gives."""

from __future__ import annotations

import re

import pytest
import torch
from hub_server import COMMIT, FakeHub

import flashmoe
from flashmoe import convert as convert_module
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.sources import hub as hub_module
from flashmoe.store import Store, expert_file_name

ARCH = "qwen3_5_moe"
REPO = "tiny/qwen35"
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300]


@pytest.fixture
def hub(built, monkeypatch):
    server = FakeHub({REPO: built.checkpoint(ARCH)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.close()


def shards_of(built) -> list[str]:
    return sorted(p.name for p in built.checkpoint(ARCH).glob("*.safetensors"))


def test_a_hub_model_converts_shard_by_shard_to_the_store_its_folder_gives(built, hub, tmp_path, monkeypatch):
    in_flight = []
    fetch = hub_module.HubRepo.fetch

    def counting_fetch(self, file):
        path = fetch(self, file)
        in_flight.append(len(list(self.folder.glob("*.safetensors"))))
        return path

    monkeypatch.setattr(hub_module.HubRepo, "fetch", counting_fetch)
    store = convert(f"hf://{REPO}", tmp_path / "store")
    local = built.store(ARCH, 4)
    assert torch.equal(flashmoe.load(store).logits(PROMPT), flashmoe.load(local).logits(PROMPT))
    for layer in Store(local).config.moe_layers:
        name = expert_file_name(layer)
        assert (store / name).read_bytes() == (local / name).read_bytes()
    assert Store(store).manifest["source"]["path"] == f"hf://{REPO}@main"
    assert not (store / hub_module.SOURCE_DIR).exists()  # nothing of the source is kept
    assert len(in_flight) == len(shards_of(built))  # every shard fetched once
    assert max(in_flight) <= 3  # the shards in flight, never the checkpoint


def test_a_dropped_connection_resumes_mid_shard(built, hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub keeps what it received in whole chunks (10 MB); these shards are smaller than one
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    name = max(shards_of(built), key=lambda n: (built.checkpoint(ARCH) / n).stat().st_size)
    hub.drop_once.add(name)
    store = convert(REPO, tmp_path / "store", revision=COMMIT)
    ranges = hub.downloads(name)  # besides the header read (bytes=0-N): the download, then its resumption
    assert ranges.count(None) == 1 and any(r and re.fullmatch(r"bytes=[1-9]\d*-", r) for r in ranges)
    assert torch.equal(flashmoe.load(store).logits(PROMPT), flashmoe.load(built.store(ARCH, 4)).logits(PROMPT))


def test_an_interrupted_hub_conversion_resumes_without_downloading_again(built, hub, tmp_path, monkeypatch):
    write_layer, done = convert_module.Converter._write_layer, []

    def interrupt_after_two(self, *args):
        if len(done) == 2:
            raise KeyboardInterrupt
        write_layer(self, *args)
        done.append(args[0])

    monkeypatch.setattr(convert_module.Converter, "_write_layer", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert(REPO, tmp_path / "store")
    monkeypatch.setattr(convert_module.Converter, "_write_layer", write_layer)
    store = convert(REPO, tmp_path / "store")
    for name in shards_of(built):  # a shard downloaded before the interruption is not downloaded again
        assert hub.downloads(name).count(None) == 1, name
    assert torch.equal(flashmoe.load(store).logits(PROMPT), flashmoe.load(built.store(ARCH, 4)).logits(PROMPT))


def test_hub_problems_are_one_clear_line(hub, tmp_path, monkeypatch, run_cli):
    with pytest.raises(FlashMoeError, match="no such model"):
        convert("nobody/nothing", tmp_path / "a")
    with pytest.raises(FlashMoeError, match="no such revision"):
        convert(REPO, tmp_path / "b", revision="v9")
    with pytest.raises(FlashMoeError, match="--revision is for a Hugging Face Hub repository"):
        convert(tmp_path, tmp_path / "c", revision="main")

    class Usage:
        free = 1000

    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda path: Usage)
    code, out, err = run_cli("convert", REPO, tmp_path / "d")
    assert code != 0 and "the store and two source shards in flight" in err


def test_an_mlx_model_converts_from_the_hub(built, monkeypatch, tmp_path):
    pytest.importorskip("mlx_lm")
    server = FakeHub({"mlx-community/tiny-4bit": built.mlx_checkpoint("qwen3_5_moe_vl", 4, 32)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        store = convert("mlx-community/tiny-4bit", tmp_path / "store")
    finally:
        server.close()
    local = built.mlx_store("qwen3_5_moe_vl", 4, 32)
    assert Store(store).manifest["source"]["experts"] == "repacked"
    assert torch.equal(flashmoe.load(store).logits(PROMPT), flashmoe.load(local).logits(PROMPT))


def test_a_gguf_converts_from_the_hub(built, tmp_path, monkeypatch):
    from hub_server import FakeHub

    from flashmoe.sources.gguf import split_names

    path = built.gguf(ARCH, "q8_0")  # skips where llama.cpp's converter is not at hand
    server = FakeHub({"ggml-org/tiny-GGUF": path.parent})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        store = convert(f"hf://ggml-org/tiny-GGUF/{path.name}", tmp_path / "store")
        with pytest.raises(FlashMoeError, match="has no file nothing.gguf"):
            convert("ggml-org/tiny-GGUF/nothing.gguf", tmp_path / "other")
    finally:
        server.close()
    local = convert(path, tmp_path / "local")
    assert torch.equal(flashmoe.load(store).logits(PROMPT), flashmoe.load(local).logits(PROMPT))
    assert Store(store).manifest["source"]["path"] == f"hf://ggml-org/tiny-GGUF/{path.name}@main"
    assert not (store / hub_module.SOURCE_DIR).exists()
    assert split_names("Q4_K_M/m-00001-of-00003.gguf") == [f"Q4_K_M/m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
