"""The command line as a user runs it: convert, info, generate with streaming output, and one-line errors."""

from __future__ import annotations

import sys

import pytest

from flashmoe import cli


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["flashmoe", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_convert_info_generate(built, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    code, out, err = run(monkeypatch, capsys, "convert", built.checkpoint("qwen3_5_moe_vl"), store, "--bits", "8")
    assert code == 0, err
    assert "leaving out the vision tower" in err and "done:" in err

    code, out, err = run(monkeypatch, capsys, "info", store, "--verify")
    assert code == 0, err
    assert "Qwen3_5MoeForConditionalGeneration" in out and "8-bit affine, group 64" in out
    assert "all 64 expert checksums match" in out

    code, out, err = run(monkeypatch, capsys, "generate", store, "--prompt", "Hello world", "--chat",
                         "--max-tokens", "6", "--cache-gb", "0.001", "--experts-per-token", "2")
    assert code == 0, err
    assert out.strip()  # the streamed text
    assert "6 tokens" in err and "tok/s decode" in err and "MB of experts read" in err and "cache hit rate" in err


@pytest.mark.parametrize("args,message", [
    (["info", "/no/such/store"], "does not exist"),
    (["convert", "/no/such/ckpt", "/tmp/x"], "is not a folder"),
    (["generate", "/no/such/store", "--prompt", "hi"], "does not exist"),
])
def test_errors_are_one_line(monkeypatch, capsys, args, message):
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 1
    assert "error:" in err and message in err


def test_bad_option_value(built, tmp_path, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "convert", built.checkpoint("qwen3_5_moe"), tmp_path / "s", "--bits", "3")
    assert code == 1 and "--bits must be one of (2, 4, 8)" in err
    code, out, err = run(monkeypatch, capsys, "generate", "x", "--prompt", "hi", "--max-tokens", "0")
    assert code == 2 and "max-tokens" in err


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "demo", "--workdir", tmp_path, "--max-tokens", "8")
    assert code == 0, err
    assert "architecture: Qwen3_5MoeForCausalLM" in out
    assert "8 tokens" in err and "MB of experts read" in err
    assert (tmp_path / "store" / "manifest.json").is_file()
