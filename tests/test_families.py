"""The model seam: families are found by architecture name, and the engine's generic parts name none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import flashmoe
from flashmoe.errors import FlashMoeError
from flashmoe.models import FAMILIES, family_of

GENERIC = ["engine.py", "convert.py", "decode_graphs.py", "routed.py", "experts.py", "store.py", "server.py"]
FAMILY_WORDS = re.compile(r"qwen|deltanet|linear_attention|full_attention|mixtral|deepseek", re.IGNORECASE)


@pytest.mark.parametrize("name", GENERIC)
def test_generic_modules_name_no_family(name):
    source = (Path(flashmoe.__file__).parent / name).read_text()
    assert not FAMILY_WORDS.findall(source), f"{name} names a family: ask models.family_of(architecture) instead"


def test_every_registered_architecture_has_a_module_that_knows_it():
    for arch in FAMILIES:
        family = family_of(arch)
        assert arch in family.ARCHITECTURES
        for name in ("config_from_hf", "resident_shapes", "resident_sources", "expert_prefix", "describe", "Model"):
            assert hasattr(family, name), f"{family.__name__} lacks {name}"


def test_an_unknown_architecture_names_the_supported_ones():
    with pytest.raises(FlashMoeError, match="unsupported architecture 'LlamaForCausalLM'.*Qwen3NextForCausalLM"):
        family_of("LlamaForCausalLM")
