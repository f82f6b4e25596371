"""benchmarks/quality.py (issue 13): its perplexity is transformers' on the same windows, and its rows move the
way quantization and a smaller K move a model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

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
