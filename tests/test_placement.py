"""A model over several devices (placement.py): blocks of layers, one per device, answering as one device does.

The CPU tests split a model into CPU parts, which runs every line of the orchestration (weights by block, one RAM
tier shared by the parts' fetchers, the hidden state handed on); the GPU tests need two GPUs (the device tool's
several-GPU kinds)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import flashmoe
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.placement import parse_devices, split_layers
from flashmoe.store import Store
from conftest import LAYOUTS, rel_error
from test_reference import PROMPT


def test_blocks_follow_capacity_and_none_is_empty():
    assert split_layers([10] * 8, [1, 1]) == [range(0, 4), range(4, 8)]
    assert split_layers([10] * 8, [3, 1]) == [range(0, 6), range(6, 8)]
    # the embedding on the first device and the head on the last count against them
    assert split_layers([10] * 8, [1, 1], first_bytes=40) == [range(0, 2), range(2, 8)]
    assert split_layers([10] * 8, [1, 1], last_bytes=40) == [range(0, 6), range(6, 8)]
    # a device with no room still gets a layer: a block is never empty
    assert split_layers([10] * 4, [1, 0, 0]) == [range(0, 2), range(2, 3), range(3, 4)]
    assert split_layers([1, 100, 1, 1], [1, 1]) == [range(0, 2), range(2, 4)]
    with pytest.raises(FlashMoeError, match="3 devices for a model of 2 layers"):
        split_layers([1, 1], [1, 1, 1])


@pytest.mark.parametrize("spec, problem", [("cuda:0,gpu1", "comma-separated list"), ("", "comma-separated"),
                                           ("cuda:0,cuda:0", "named twice"), ("cpu,cuda:0", "mixes")])
def test_bad_device_lists_are_refused_in_one_line(spec, problem):
    with pytest.raises(FlashMoeError, match=problem):
        parse_devices(spec)


@pytest.mark.parametrize("arch", LAYOUTS)
@pytest.mark.parametrize("bits", [None, 4])
def test_a_model_split_over_parts_answers_as_one(built, arch, bits):
    store = built.store(arch, bits)
    one = flashmoe.load(store, device="cpu", cache_gb=0.01)
    split = flashmoe.load(store, devices="cpu,cpu,cpu", cache_gb=0.01)
    assert [s.layers for s in split.stages][0].start == 0 and split.stages[-1].layers.stop == split.config.num_hidden_layers
    assert len(split.stages) == 3 and all(len(s.layers) for s in split.stages)
    # each part holds only its own layers' resident weights
    for s in split.stages:
        held = {int(n.split(".")[2]) for n in s.model.w if n.startswith("model.layers.")}
        assert held == set(s.layers)
    expected = one.logits(PROMPT)
    assert torch.equal(split.logits(PROMPT), expected)
    # token by token too (the one-token paths; a quantized store's CPU kernels round differently from the prompt's)
    steps = []
    for model in (one, split):
        state = model.new_state()
        steps.append(torch.cat([model.forward(PROMPT[:5], state)] + [model.forward([t], state) for t in PROMPT[5:]]))
    assert torch.equal(steps[1], steps[0])
    assert list(split.generate(PROMPT[:8], 10, stop_token_ids=[])) == list(one.generate(PROMPT[:8], 10, stop_token_ids=[]))
    # one RAM tier serves every part: its budget holds, and the stats add the parts up
    assert split.stats["cache_bytes"] <= 0.01e9 and split.stats["expert_reads"] > 0
    assert split.placement()["blocks"][1]["layers"] == [split.stages[1].layers.start, split.stages[1].layers.stop - 1]
    one.close()
    split.close()


def test_a_tied_head_is_on_the_last_part_too(built, tmp_path):
    store = convert(built.checkpoint("qwen3_moe", tie_word_embeddings=True), tmp_path / "tied")
    one = flashmoe.load(store, device="cpu", cache_gb=0.01)
    split = flashmoe.load(store, devices="cpu,cpu", cache_gb=0.01)
    assert "lm_head.weight" not in one.model.w and split.stages[-1].model.lm_head is not None
    assert torch.equal(split.logits(PROMPT), one.logits(PROMPT))


def test_a_shared_ram_tier_too_small_for_a_layer_still_answers(built):
    """Parts take turns with one RAM tier of a few slots: each part's reads evict the others' experts."""
    store = built.store("qwen3_5_moe", 4)
    blob = Store(store).expert_blob_bytes
    one = flashmoe.load(store, device="cpu", cache_gb=0)
    split = flashmoe.load(store, devices="cpu,cpu", cache_gb=3 * blob / 1e9)
    assert rel_error(split.logits(PROMPT), one.logits(PROMPT)) < 1e-6
    assert split.stats["cache_evictions"] > 0


# ---- two GPUs ------------------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two GPUs")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("arch", LAYOUTS)
def test_two_gpus_answer_as_one(built, arch):
    """Every expert in VRAM (whole-layer graphs per GPU), and the host-driven path with small VRAM caches."""
    store = built.store(arch, 4)
    blob = Store(store).expert_blob_bytes
    one = flashmoe.load(store, device="cuda:0", dtype=torch.float32)
    two = flashmoe.load(store, devices="cuda:0,cuda:1", dtype=torch.float32)
    assert [s.device for s in two.stages] == [torch.device("cuda:0"), torch.device("cuda:1")]
    one.warm_cache()
    two.warm_cache()
    assert all(s.fetcher.resident_slots() is not None for s in two.stages)
    assert rel_error(two.logits(PROMPT).cpu(), one.logits(PROMPT).cpu()) < 1e-5
    s1, s2 = one.new_state(), two.new_state()
    one.forward(PROMPT[:8], s1)
    two.forward(PROMPT[:8], s2)
    for t in PROMPT[8:20]:
        assert rel_error(two.forward([t], s2).cpu(), one.forward([t], s1).cpu()) < 1e-5
    graphs = {k for k in s2.decode_graphs if isinstance(k, tuple) and k[0] == "resident"}
    assert {two._stage_of[k[1]].device.index for k in graphs} == {0, 1}  # each GPU replays its own graphs
    greedy = list(one.generate(PROMPT[:8], 16, stop_token_ids=[]))
    assert list(two.generate(PROMPT[:8], 16, stop_token_ids=[])) == greedy
    # small VRAM caches on both GPUs and a small shared pinned RAM tier: reads, copies and the front/back graphs
    small = flashmoe.load(store, devices="cuda:0,cuda:1", dtype=torch.float32, vram_cache_gb=8 * blob / 1e9,
                          cache_gb=6 * blob / 1e9)
    assert list(small.generate(PROMPT[:8], 16, stop_token_ids=[])) == greedy
    s = small.stats
    assert s["vram_cache_evictions"] > 0 and s["expert_reads"] > 0
    assert small.placement()["vram_cache_bytes"] <= 8 * blob  # --vram-cache-gb is the total over the GPUs
    # every expert in the shared pinned RAM tier: each GPU's kernels read it over PCIe (zero copy)
    ram = flashmoe.load(store, devices="cuda:0,cuda:1", dtype=torch.float32, vram_cache_gb=8 * blob / 1e9,
                        cache_gb=(Store(store).expert_bytes // blob + 1) * blob / 1e9)
    ram.warm_cache()
    assert all(st.fetcher.resident_slots() is not None for st in ram.stages)
    assert list(ram.generate(PROMPT[:8], 16, stop_token_ids=[])) == greedy
    assert ram.stats["expert_bytes_zero_copy"] > 0 and ram.stats["expert_reads"] == 0
    for m in (one, two, small, ram):
        m.close()


def test_the_cli_spreads_layers_over_devices_and_says_where(run_cli, built):
    store = built.store("qwen3_moe", 4)
    code, out, err = run_cli("generate", store, "--prompt", "Hello", "--max-tokens", "4", "--devices", "cpu,cpu")
    assert code == 0, err
    assert re.search(r"the rest read from disk as needed; cpu: layers 0-\d; cpu: layers \d-3\n", err)
    code, out, err = run_cli("generate", store, "--prompt", "Hello", "--devices", "cuda:0,gpu1")
    assert code == 1 and "devices must be a comma-separated list like cuda:0,cuda:1" in err


@pytest.mark.parametrize("arch, bits, ranks", [("qwen3_5_moe", 4, 2), ("deepseek_v3", None, 3)])
def test_the_ranks_of_a_process_group_answer_as_one_process(built, tmp_path, arch, bits, ranks):
    """torchrun, gloo on the CPU: each rank holds its block's weights and experts, the hidden state goes rank to rank,
    every rank ends with the same logits, the one process's."""
    store = built.store(arch, bits)
    one = flashmoe.load(store, device="cpu", cache_gb=0.01)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: bit-equal sums need the same split of the work (alone, this process had 2)
    try:
        compare_ranks(one, store, tmp_path, ranks, env)
    finally:
        torch.set_num_threads(threads)
        one.close()


def compare_ranks(one, store, tmp_path, ranks: int, env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                           "--master-port", str(free_port()), os.path.join(os.path.dirname(__file__), "tools",
                                                                           "pipeline_rank.py"),
                           str(store), str(tmp_path), ",".join(map(str, PROMPT))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(ranks)]
    covered = [layer for r in results for layer in r["layers"][0]]
    assert covered == list(range(one.config.num_hidden_layers))  # one block a rank, in order, none left out
    for r in results:
        assert r["held"] == r["layers"][0] and r["expert_reads"] > 0
        assert torch.equal(r["logits"], results[0]["logits"]) and r["sampled"] == results[0]["sampled"]
    assert torch.equal(results[0]["logits"], one.logits(PROMPT))
    state = one.new_state()
    steps = torch.cat([one.forward(PROMPT[:5], state)] + [one.forward([t], state) for t in PROMPT[5:]])
    assert torch.equal(results[-1]["steps"], steps)
    assert results[0]["greedy"] == list(one.generate(PROMPT[:8], 10, stop_token_ids=[]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_runs_the_cli_one_block_a_rank_and_rank_0_speaks(built, tmp_path):
    store = built.store("qwen3_moe", 4)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "flashmoe", "generate", str(store), "--prompt", "Hello world",
                           "--max-tokens", "5", "--distributed"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("5 tokens") == 1  # rank 0's stats line alone
    alone = subprocess.run([sys.executable, "-m", "flashmoe", "generate", str(store), "--prompt", "Hello world",
                            "--max-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert done.stdout == alone.stdout and done.stdout.strip()  # the same text, once
    # each rank said where its block went
    assert re.search(r"rank 0 of 2: layers 0-\d", done.stderr) and re.search(r"rank 1 of 2: layers \d-3", done.stderr)


@pytest.mark.gpu
@two_gpus
def test_torchrun_over_two_gpus_answers_as_one_gpu(built, tmp_path):
    """NCCL between the ranks, each on its local rank's GPU with its decode graphs."""
    store = built.store("qwen3_5_moe", 4)
    one = flashmoe.load(store, device="cuda:0", dtype=torch.float32)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), os.path.join(os.path.dirname(__file__), "tools", "pipeline_rank.py"),
                           str(store), str(tmp_path), ",".join(map(str, PROMPT)), "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    assert rel_error(results[1]["logits"], one.logits(PROMPT).cpu()) < 1e-5
    state = one.new_state()
    steps = torch.cat([one.forward(PROMPT[:5], state)] + [one.forward([t], state) for t in PROMPT[5:]]).cpu()
    assert rel_error(results[0]["steps"], steps) < 1e-5
    assert results[0]["greedy"] == results[1]["greedy"] == list(one.generate(PROMPT[:8], 10, stop_token_ids=[]))
    one.close()


def _serve(cmd: list[str], port: int) -> subprocess.Popen:
    import time
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(proc.stdout.read().decode()[-3000:])
            time.sleep(0.2)


def _answers(port: int, prompts: list[str]) -> list[str]:
    """The prompts asked at once (the server interleaves them), greedy."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)

    def ask(prompt):
        r = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(ask, prompts))


def test_a_served_model_over_torchrun_ranks_answers_as_one_process(built):
    """Rank 0 serves and announces each forward; rank 1 follows, keeping each sequence's caches under its id."""
    pytest.importorskip("openai")
    store = str(built.store("qwen3_5_moe", 4))
    prompts = ["Hello there", "The quick brown fox", "One two three four"]
    port = free_port()
    alone = _serve([sys.executable, "-m", "flashmoe", "serve", store, "--port", str(port), "--model-name", "m"], port)
    try:
        expected = [_answers(port, [p])[0] for p in prompts]
    finally:
        alone.terminate()
        alone.wait(timeout=30)
    port = free_port()
    ranks = _serve([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), "-m", "flashmoe", "serve", store, "--port", str(port), "--model-name", "m",
                    "--distributed"], port)
    try:
        assert _answers(port, prompts) == expected  # three sequences interleaved on both ranks
        assert _answers(port, prompts[:1]) == expected[:1]  # and again, after the first three were dropped
    finally:
        ranks.terminate()
        out = ranks.communicate(timeout=60)[0].decode()
    # both ranks loaded their blocks and ended without an error of ours (torchrun prints its own traceback on SIGTERM)
    assert "rank 1 of 2: layers" in out and not re.search(r'File ".*/flashmoe/', out), out[-4000:]
