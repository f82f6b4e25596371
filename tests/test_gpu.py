"""The reference checks on an NVIDIA GPU (run through the device tool; skipped where CUDA is absent)."""

from __future__ import annotations

import pytest
import torch

import flashmoe
from conftest import ARCHS, load_reference, rel_error
from test_reference import PROMPT

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_float32_matches_transformers_exactly(built, arch):
    model = flashmoe.load(built.store(arch, None), device="cuda", dtype=torch.float32)
    ref = load_reference(built.checkpoint(arch), arch)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
        greedy = ref.generate(torch.tensor([PROMPT[:11]]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                              min_new_tokens=20)[0, 11:].tolist()
    assert rel_error(model.logits(PROMPT).cpu(), expected) < 1e-3
    assert list(model.generate(PROMPT[:11], 20, stop_token_ids=[])) == greedy


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bfloat16_is_close(built, arch):
    model = flashmoe.load(built.store(arch, None), device="cuda")  # bf16 by default on the GPU
    ref = load_reference(built.checkpoint(arch), arch)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    assert rel_error(model.logits(PROMPT).cpu(), expected) < 3e-2


def test_cuda_4bit_matches_cpu_4bit(built):
    store = built.store("qwen3_5_moe", 4)
    cpu = flashmoe.load(store).logits(PROMPT)
    gpu = flashmoe.load(store, device="cuda", dtype=torch.float32).logits(PROMPT).cpu()
    assert rel_error(gpu, cpu) < 1e-3
