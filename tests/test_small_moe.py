"""The small MoE shipped in the package (flashmoe/data/small-moe, issue 13): it is a trained model (held-out text it
never saw reads at a low perplexity), it answers in its chat template and in JSON when asked, its card's numbers are
its own, and every file of it is package data (a wheel carries it)."""

from __future__ import annotations

import fnmatch
import json
import math
import tomllib
from pathlib import Path

import torch

import flashmoe
from flashmoe.data import SMALL_MOE

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_of_the_store_is_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["flashmoe.data"]
    files = [p.relative_to(SMALL_MOE.parent).as_posix() for p in SMALL_MOE.rglob("*") if p.is_file()]
    assert "small-moe/manifest.json" in files and "small-moe/MODEL_CARD.md" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)] == []


def test_held_out_text_reads_at_a_trained_models_perplexity():
    model = flashmoe.load(SMALL_MOE)
    ids = model.tokenizer((Path(__file__).parent / "data" / "small_moe_heldout.txt").read_text())["input_ids"]
    loss = torch.nn.functional.cross_entropy(model.logits(ids[:-1]), torch.tensor(ids[1:])).item()
    assert math.exp(loss) < 60  # 34 measured; random weights give about the vocabulary's size, 8192


def test_a_greedy_continuation_is_the_recorded_text(monkeypatch):
    from flashmoe.kernels import cpu_native

    monkeypatch.setattr(cpu_native, "INT8_ACTIVATIONS", False)  # float activations: no rounding that CPUs differ in
    model = flashmoe.load(SMALL_MOE)
    out = list(model.generate(model.tokenizer("The kernel")["input_ids"], 24))
    assert model.tokenizer.decode(out) == (" will not be able to handle the error.\nThe kernel will not attempt to "
                                           "allocate the kernel memory.\nThe kernel")


def test_it_answers_in_json_when_asked():
    model = flashmoe.load(SMALL_MOE)
    ids = model.encode_chat([{"role": "user", "content": 'Describe the manual page of `tar` as JSON with the keys '
                                                         '"name", "section" and "summary".'}], enable_thinking=False)
    out = [t for t in model.generate(ids, 60) if t not in model.eos_token_ids]
    answer = json.loads(model.tokenizer.decode(out))
    assert set(answer) == {"name", "section", "summary"} and answer["name"] == "tar"


def test_the_card_states_the_store_and_training_it_ships_with():
    card = (SMALL_MOE / "MODEL_CARD.md").read_text()
    training = json.loads((SMALL_MOE / "training.json").read_text())
    manifest = json.loads((SMALL_MOE / "manifest.json").read_text())
    assert f"{training['steps']} steps" in card and f"{training['heldout_loss']}" in card
    assert f"group {manifest['quantization']['group_size']}" in card and f"{manifest['quantization']['bits']}-bit" in card
