"""What a careless or hostile user types at the command line gets one line, never a traceback."""

from __future__ import annotations

import json
import shutil
import socket

import pytest





def error_line(err: str) -> str:
    """The error: one line, the last one printed."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


@pytest.mark.parametrize("option, value, message", [
    ("--cache-gb", "inf", "cache_gb must be >= 0, not inf"),
    ("--cache-gb", "nan", "Invalid value for '--cache-gb'"),  # typer's own usage error (exit 2)
    ("--seed", str(2**70), "seed must fit in 64 bits"),
    ("--device", "tpu", "device must be 'cpu' or 'cuda'"),
    ("--cpu-share", "most", "--cpu-share is a number from 0 to 1, or auto, not 'most'"),
    ("--cpu-share", "auto", "cpu_share is for device='cuda'"),
])
def test_bad_load_and_sampling_options(run_cli, built, option, value, message):
    code, _, err = run_cli("generate", built.store("qwen3_5_moe", 4), "--prompt", "hi",
                       "--max-tokens", "2", option, value)
    usage_error = message.startswith("Invalid value")
    assert code == (2 if usage_error else 1), err
    assert message in (err if usage_error else error_line(err))


def test_a_gpu_out_of_memory_is_one_line_saying_what_to_free(run_cli, built, monkeypatch):
    import torch

    from flashmoe.engine import Model

    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
            "is free. Including non-PyTorch memory, this process has 78.1 GiB memory in use. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")

    monkeypatch.setattr(Model, "generate", no_room)
    code, _, err = run_cli("generate", built.store("qwen3_5_moe", 4), "--prompt", "hi", "--max-tokens", "2")
    line = error_line(err)
    assert code == 1 and "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB" in line
    assert "1.06 GiB is free)" in line and "--vram-cache-gb" in line and "PYTORCH_CUDA_ALLOC_CONF" not in line


def test_top_p_help_matches_what_is_accepted(run_cli, built):
    code, _, err = run_cli("generate", built.store("qwen3_5_moe", 4), "--prompt", "hi", "--top-p", "0")
    assert code == 2 and "must be > 0 and <= 1" in err
    code, out, _ = run_cli("generate", "--help")
    assert "(0, 1]" in out


def test_paths_with_brackets_survive_in_messages(run_cli, tmp_path):
    missing = tmp_path / "[models]" / "store[1]"
    code, _, err = run_cli("info", missing)
    assert code == 1 and str(missing) in error_line(err)


def test_config_with_wrong_types_is_one_line(run_cli, built, tmp_path):
    ckpt = shutil.copytree(built.checkpoint("qwen3_5_moe"), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    text = config.get("text_config", config)
    for key, value in (("hidden_size", "wide"), ("num_experts", [8]), ("layer_types", 7), ("rms_norm_eps", {})):
        saved = text[key]
        text[key] = value
        (ckpt / "config.json").write_text(json.dumps(config))
        code, _, err = run_cli("convert", ckpt, tmp_path / f"store-{key}")
        assert code == 1 and key in error_line(err), err
        text[key] = saved


def test_convert_refuses_no_quant_with_bits_and_warns_without_a_tokenizer(run_cli, built, tmp_path):
    ckpt = built.checkpoint("qwen3_5_moe")
    code, _, err = run_cli("convert", ckpt, tmp_path / "a", "--no-quant", "--bits", "8")
    assert code == 1 and "--no-quant" in error_line(err)
    bare = shutil.copytree(ckpt, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    code, out, err = run_cli("convert", bare, tmp_path / "b")
    assert code == 0 and "has no tokenizer files" in err
    assert oct((tmp_path / "b" / "resident-00001-of-00001.safetensors").stat().st_mode & 0o777) == oct(
        (tmp_path / "b" / "manifest.json").stat().st_mode & 0o777)  # written like every other file


def test_ctrl_c_in_convert_says_how_to_resume(run_cli, built, monkeypatch, tmp_path):
    from flashmoe.convert import Converter

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Converter, "run", interrupted)
    code, _, err = run_cli("convert", built.checkpoint("qwen3_5_moe"), tmp_path / "s")
    assert code == 1 and "run the same flashmoe convert command again to resume" in error_line(err)


def test_generate_has_system_and_no_thinking_and_keeps_to_the_context(run_cli, built):
    store = built.store("qwen3_5_moe", 4)
    code, out, err = run_cli("generate", store, "--prompt", "hi", "--system", "Be brief.",
                         "--no-thinking", "--max-tokens", "3", "--cache-gb", "0.01")
    assert code == 0 and "3 tokens" in err, err
    code, _, err = run_cli("generate", store, "--prompt", "hello " * 5000, "--max-tokens", "3")
    assert code == 1 and "the model's context is 4096" in error_line(err)


def test_serve_checks_its_port_before_loading(run_cli, built, monkeypatch):
    import flashmoe.cli

    loaded = []
    monkeypatch.setattr(flashmoe.cli, "load_model", lambda *a, **k: loaded.append(1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("serve", built.store("qwen3_5_moe", 4), "--port", port)
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in error_line(err) and not loaded


def test_demo_with_an_unwritable_workdir(run_cli, tmp_path):
    locked = tmp_path / "a-file"  # not a folder: unwritable even for root
    locked.write_text("")
    code, _, err = run_cli("demo", "--arch", "qwen3_5_moe", "--workdir", locked)
    assert code == 1 and "pass a writable --workdir" in error_line(err)
    code, _, err = run_cli("demo", "--workdir", tmp_path)  # the shipped model is built already
    assert code == 1 and "--workdir is for --arch" in error_line(err)


def test_serve_fails_in_one_line_when_the_http_server_cannot_start(run_cli, built, monkeypatch):
    """The port was free when checked and taken before uvicorn bound it: uvicorn exits in its own thread, the model's
    loop ends with it, and the command fails (exit 1) instead of returning as if served."""
    import uvicorn

    def cannot_start(self, sockets=None):
        raise SystemExit(1)  # what uvicorn's startup does when it cannot bind

    monkeypatch.setattr(uvicorn.Server, "run", cannot_start)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run_cli("serve", built.store("qwen3_5_moe", 4), "--port", port, "--cache-gb", "0.01")
    assert code == 1 and "the HTTP server did not start" in error_line(err)
