"""benchmarks/quality.py (issue 13): its perplexity is transformers' on the same windows, and its rows move the
way quantization and a smaller K move a model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch

from flashmoe.eviction import POLICIES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quality_rows_by_bits_and_k(built, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    checkpoint = Path(built.checkpoint("qwen3_5_moe"))
    tokens = np.random.default_rng(0).integers(0, 512, 400).astype(np.uint16)
    np.save(tmp_path / "heldout.npy", tokens)
    rows = quality.main(["--checkpoint", str(checkpoint), "--tokens", str(tmp_path / "heldout.npy"), "--work",
                         str(tmp_path / "work"), "--bits", "none,8,2", "--groups", "32", "--k", "4,2", "--windows", "2",
                         "--window", "12"])["rows"]
    by = {(r["bits"], r["k"]): r for r in rows}
    assert set(by) == {(None, 4), (None, 2), (8, 4), (8, 2), (2, 4), (2, 2)}
    # the unquantized model at its K is transformers' own: the same loss on the same windows
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    loss, n = 0.0, 0
    for w in quality.windows_of(tokens, 2, 12):
        with torch.no_grad():
            logits = reference(torch.tensor([w[:-1]])).logits[0]
        loss += torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
        n += len(w) - 1
    assert math.isclose(by[None, 4]["perplexity"], math.exp(loss / n), rel_tol=1e-4)
    assert by[None, 4]["agreement"] == 1.0 and by[8, 4]["agreement"] >= 0.9
    assert by[8, 4]["agreement"] >= by[2, 4]["agreement"]
    assert by[None, 2]["expert_mb"] == by[None, 4]["expert_mb"] / 2 and by[2, 4]["expert_mb"] < by[8, 4]["expert_mb"]


def test_json_reliability_counts_what_parses_and_the_grammar_always_does(built, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("json_reliability", BENCHMARKS / "json_reliability.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    chats = tmp_path / "chats.jsonl"
    asked = [{"kind": "page_json", "name": n, "messages": [
        {"role": "user", "content": f"Describe `{n}` as JSON."},
        {"role": "assistant", "content": json.dumps({"name": n, "section": "1", "summary": "a tool"})}]}
        for n in ("ls", "cp", "mv")]
    chats.write_text("\n".join(json.dumps(a) for a in asked) + "\n")
    # random weights write no JSON and never end a string: nudge them (after the grammar's mask) toward tokens that
    # close one and the end of the turn, so answers end and the count of what parses means something
    from transformers import AutoTokenizer

    from flashmoe.grammar import GrammarConstraint

    checkpoint = built.checkpoint("qwen3_5_moe")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    closing = [i for t, i in tok.get_vocab().items() if set(tok.convert_tokens_to_string([t])) & set('"}')]
    closing += [tok.convert_tokens_to_ids("<|im_end|>")]
    masked = GrammarConstraint.mask

    def mask(self, logits):
        masked(self, logits)
        logits[..., closing] += 40.0

    monkeypatch.setattr(GrammarConstraint, "mask", mask)
    rows = bench.main(["--checkpoint", str(checkpoint), "--chats", str(chats), "--work",
                       str(tmp_path / "work"), "--bits", "none,2", "--n", "2", "--max-tokens", "80"])["rows"]
    assert [r["bits"] for r in rows] == [None, 2]
    for r in rows:  # under the grammar every answer parses, with the keys asked for; free-running, noise
        assert r["grammar_parses"] == r["grammar_keys"] == 1.0 and r["grammar_cut"] == 0.0
        assert r["free_parses"] < 1.0
    assert bench.judge('{"name": "ls", "section": "1", "summary": "x"}', {"name": "ls", "section": "", "summary": ""}) \
        == (True, True, True)
    assert bench.judge('{"name": "cp"}', {"name": "ls", "section": "", "summary": ""}) == (True, False, False)
    assert bench.judge('{"name": ', {"name": "ls"}) == (False, False, False)


def test_routing_traces_of_a_model_agree_with_transformers_routing(built, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("routing_traces", BENCHMARKS / "routing_traces.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    np.save(tmp_path / "heldout.npy", np.random.default_rng(1).integers(0, 512, 300).astype(np.uint16))
    got = bench.main(["--store", str(built.store("qwen3_5_moe", None)), "--checkpoint",
                      str(built.checkpoint("qwen3_5_moe")), "--tokens", str(tmp_path / "heldout.npy"), "--windows", "2",
                      "--window", "40", "--trace-out", str(tmp_path / "trace.npy")])
    trace = np.load(tmp_path / "trace.npy")
    assert trace.shape == got["trace"].shape and trace.shape[0] == 80 and (trace == got["trace"]).all()
    for p in got["prefetch"]:  # flashmoe's recorded reuse is transformers' "previous token" guess: the same routing
        layer = next(r for r in got["layers"] if r["layer"] == p["layer"])
        assert abs(p["previous_token"] - layer["reuse"]) < 1e-9
        assert max(p["router_ahead"], p["previous_token"]) <= p["both"] <= 1.0
    for c in got["cache"]:
        assert all(c[name] <= c["belady"] + 1e-12 for name in POLICIES)


def test_the_quality_plot_draws_a_line_per_format(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("plot_quality", BENCHMARKS / "plot_quality.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rows = json.loads((BENCHMARKS / "results" / "small-moe-quality.json").read_text())
    lines = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: lines.append((kw["label"], x, y)))
    plot.plot(rows, tmp_path / "q.png", "t")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(label for label, _, _ in lines) == sorted(
        ["unquantized (bf16)", "8-bit, group 32", "4-bit, group 32", "4-bit, group 80", "4-bit, group 160",
         "2-bit, group 32"])
    for _, x, y in lines:  # a point per K, by bytes read
        assert len(x) == 4 and x == sorted(x)
