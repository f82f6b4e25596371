"""The command line as a user runs it: convert, info, generate with streaming output, and one-line errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest





def test_convert_info_generate(run_cli, built, tmp_path):
    store = tmp_path / "store"
    code, out, err = run_cli("convert", built.checkpoint("qwen3_5_moe_vl"), store, "--bits", "8")
    assert code == 0, err
    assert "leaving out the vision tower" in err and "done:" in err

    code, out, err = run_cli("info", store, "--verify")
    assert code == 0, err
    assert "Qwen3_5MoeForConditionalGeneration" in out and "8-bit affine, group 64" in out
    assert "all 64 expert checksums match" in out
    # what the residents take on a GPU in each format (residents.gpu_bytes), smallest last
    sizes = re.search(r"resident on a GPU: ([\d.]+) KB bf16, ([\d.]+) KB int8, ([\d.]+) KB int4", out)
    assert sizes and float(sizes[1]) > float(sizes[2]) > float(sizes[3]), out

    code, out, err = run_cli("generate", store, "--prompt", "Hello world", "--chat",
                         "--max-tokens", "6", "--cache-gb", "0.001", "--experts-per-token", "2")
    assert code == 0, err
    assert out.strip()  # the streamed text
    assert "6 tokens" in err and "tok/s decode" in err and "MB of experts read" in err and "cache hit rate" in err
    # where the weights went, said at load: the cache was 1 MB of the store's experts
    assert re.search(r"resident weights [\d.]+ [KM]B on cpu; experts [\d.]+ MB: RAM cache [\d.]+ [KM]B \(\d+%\), the rest", err)


@pytest.mark.parametrize("args,message", [
    (["info", "/no/such/store"], "does not exist"),
    (["convert", "/no/such/ckpt", "/tmp/x"], "is not a folder"),
    (["generate", "/no/such/store", "--prompt", "hi"], "does not exist"),
])
def test_errors_are_one_line(run_cli, args, message):
    code, out, err = run_cli(*args)
    assert code == 1
    assert "error:" in err and message in err


def test_bad_option_value(run_cli, built, tmp_path):
    code, out, err = run_cli("convert", built.checkpoint("qwen3_5_moe"), tmp_path / "s", "--bits", "3")
    assert code == 1 and "--bits must be one of (2, 4, 8)" in err
    code, out, err = run_cli("generate", "x", "--prompt", "hi", "--max-tokens", "0")
    assert code == 2 and "max-tokens" in err


def test_demo_runs_the_shipped_model(run_cli):
    code, out, err = run_cli("demo", "--max-tokens", "12")
    assert code == 0, err
    assert "architecture: Qwen3_5MoeForCausalLM" in out and "quantization: 4-bit affine, group 32" in out
    assert "Python is " in out and "`tar`" in out  # the continuation reads on from its prompt; the answer names tar
    assert "12 tokens" in err and "MB of experts read" in err
    # what it writes is words: of the continuation's, most are among the 20,000 commonest of its training text
    vocabulary = set((Path(__file__).parent / "data" / "corpus_words.txt").read_text().split())
    words = re.findall(r"[A-Za-z]+", out[out.index("Python is"):].split("\n", 2)[0] + " " + out.split("`tar`")[1])
    assert len(words) >= 8 and sum(w.lower() in vocabulary for w in words) >= 0.8 * len(words), words


def test_demo_builds_a_random_weight_model_of_a_family(run_cli, tmp_path):
    code, out, err = run_cli("demo", "--arch", "qwen3_5_moe", "--workdir", tmp_path, "--max-tokens", "8")
    assert code == 0, err
    assert "architecture: Qwen3_5MoeForCausalLM" in out
    assert "8 tokens" in err and "MB of experts read" in err
    assert (tmp_path / "store" / "manifest.json").is_file()


def test_chat_keeps_history_and_resets(run_cli, built, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd again\n/reset\nFresh start\n/exit\n"))
    code, out, err = run_cli("chat", built.store("qwen3_5_moe", 4), "--max-tokens", "4",
                         "--no-thinking", "--cache-gb", "0.01", "--system", "Be brief.")
    assert code == 0, err
    assert out.count("model> ") == 3
    turns = [line.split(",")[0] for line in err.splitlines() if line.startswith("turn ")]
    assert turns == ["turn 1", "turn 2", "turn 1"]  # the history grew, then /reset cleared it
    assert "history cleared" in err and "tok/s decode" in err and "cache hit rate" in err


def test_chat_reads_every_expert_in_first_when_a_cache_holds_them_all(run_cli, built, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/exit\n"))
    code, out, err = run_cli("chat", built.store("qwen3_5_moe", 4), "--max-tokens", "4", "--no-thinking")
    assert code == 0, err
    assert "reading every expert into the caches" in err and "before chatting" in err
    assert "0.0 MB of experts read, cache hit rate 100%" in err  # the first reply reads nothing from disk
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/exit\n"))
    code, out, err = run_cli("chat", built.store("qwen3_5_moe", 4), "--max-tokens", "4", "--no-thinking", "--no-warm")
    assert code == 0 and "reading every expert" not in err and "0.0 MB of experts read" not in err, err


def test_serve_command_answers_the_openai_client(built, tmp_path):
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flashmoe.cli", "serve", str(built.store("qwen3_next", 4)),
                             "--port", str(port), "--model-name", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "FLASHMOE_API_KEY": "k"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1 and r.model == "local"
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
    out = proc.stdout.read().decode()
    # SIGTERM stops it as Ctrl-C does: the HTTP thread shut down, the model (in the main thread) closed, no traceback
    assert rc == 0 and "Traceback" not in out and "Finished server process" in out, out
    assert "reading every expert into the caches" in out  # the default RAM cache holds them all: read in at start
