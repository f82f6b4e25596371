"""Routing traces: the calibrated generator holds its published fit; files round-trip; a bad file is one line."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe import traces
from flashmoe.errors import FlashMoeError
from flashmoe.traces import TraceShape, distinct_per_window, reuse_rate


def test_calibrated_trace_matches_the_published_qwen35_figures():
    shape = TraceShape(tokens=27 * 12, layers=61, experts=512, top_k=4)
    rng = np.random.default_rng(0)
    first = traces.skewed_layer(shape.tokens, 512, 4, *reversed(traces.layer_fit(0, 60)), rng)
    middle = traces.skewed_layer(shape.tokens, 512, 4, *reversed(traces.layer_fit(30, 60)), rng)
    assert abs(reuse_rate(first) - 0.295) < 0.03 and abs(distinct_per_window(first) - 65) < 4
    assert abs(reuse_rate(middle) - 0.337) < 0.03 and abs(distinct_per_window(middle) - 37) < 4


def test_traces_are_sorted_distinct_and_in_range():
    shape = TraceShape(tokens=30, layers=3, experts=40, top_k=5)
    for trace in (traces.uniform_trace(shape, seed=2), traces.calibrated_trace(shape, seed=2)):
        assert trace.shape == (30, 3, 5) and trace.min() >= 0 and trace.max() < 40
        assert (np.diff(trace, axis=-1) > 0).all()  # ascending, no expert twice in a step


def test_save_load_and_a_bad_file(tmp_path):
    trace = traces.uniform_trace(TraceShape(tokens=4, layers=2, experts=8, top_k=2))
    traces.save(tmp_path / "t.npy", trace)
    assert np.array_equal(traces.load(tmp_path / "t.npy"), trace)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    with pytest.raises(FlashMoeError, match="integer array \\[tokens, layers, K\\]"):
        traces.load(tmp_path / "bad.npy")


def test_sequences_of_one_model_share_its_popularity_and_a_batch_reads_less():
    """Several sequences' traces share each layer's popularity (the model's), so a batch's tokens share experts as
    uniform routing's do not; cache_sim's batch_reads counts a step's union once (identical sequences: B-fold)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cache_sim import batch_reads

    shape = TraceShape(tokens=40, layers=2, experts=128, top_k=4)
    calibrated = traces.calibrated_sequences(shape, 8, seed=1)
    assert calibrated.shape == (8, 40, 2, 4) and (np.diff(calibrated, axis=-1) > 0).all()
    assert not (calibrated[0] == calibrated[1]).all()  # their own picks
    uniform = np.stack([traces.uniform_trace(shape, seed=i) for i in range(8)])
    gain = {name: batch_reads(t, 1, 0.0, 10) / batch_reads(t, 8, 0.0, 10)
            for name, t in (("calibrated", calibrated), ("uniform", uniform))}
    assert gain["calibrated"] > 1.3 * gain["uniform"] and gain["uniform"] < 1.25
    same = np.repeat(calibrated[:1], 4, axis=0)
    assert batch_reads(same, 4, 0.0, 10) == batch_reads(same, 1, 0.0, 10) / 4
    assert batch_reads(calibrated, 8, 1.0, 10) == 0  # every expert in VRAM: nothing over PCIe


def test_a_refreshed_vram_set_pays_for_its_copies():
    """cache_sim --zero-copy: when the routing moves to other experts, refreshing the VRAM set by use counts finds
    them, and each promotion is counted as a blob over PCIe beside the misses; a margin holds back swaps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cache_sim import zero_copy_hits

    trace = np.array([[[0, 1]]] * 100 + [[[2, 3]]] * 100)  # [tokens, 1 layer, K=2]: the hot pair moves at token 100
    kept = zero_copy_hits(trace, 2, 50, every=0)
    assert kept == (100 / 300, 200 / 300)  # the prompt's pair: every lookup after token 100 a miss
    hit, pcie = zero_copy_hits(trace, 2, 50, every=16)
    assert kept[0] + 0.2 < hit < 1  # found once the new pair's decayed counts pass the old one's
    copies = pcie * 300 - (300 - hit * 300)
    assert round(copies) == 2  # the new pair, copied once
    assert zero_copy_hits(trace, 2, 50, every=16, margin=1e9) == kept  # no expert that much hotter: no swap
