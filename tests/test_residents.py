"""The resident weights' size per format on a GPU (residents.py) and the format a GPU load picks when none is asked
for: the estimate from the files' headers against what a family's model holds after load's quantization, the choice
by free VRAM, and the one-line refusal of a format that does not fit."""

from __future__ import annotations

import pytest
import torch

from flashmoe import residents
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.kernels.affine import AffineMatrix
from flashmoe.kernels.linear import held_bytes
from flashmoe.models import family_of
from flashmoe.store import Store

GB = 10**9


def held_as(store: Store, fmt: str) -> int:
    """Bytes a family's model over the store's residents holds in `fmt`, quantized as a GPU load quantizes them
    (quantized_model; here on the CPU: the same codes, scales and biases in one buffer per matrix)."""
    model = quantized_model(store, residents.BITS.get(fmt), as_read=True)
    return held_bytes(model.w) + (held_bytes(model.lm_head) if fmt != "float" and model.lm_head is not None
                                  and model.lm_head is not model.w.get("lm_head.weight") else 0)


@pytest.mark.parametrize("arch,overrides", [("qwen3_5_moe", {}), ("qwen3_moe", {"tie_word_embeddings": True}),
                                            ("mixtral", {}), ("gpt_oss", {}), ("deepseek_v3", {})])
def test_the_estimate_is_what_the_model_holds_in_each_format(built, tmp_path, arch, overrides):
    store = Store(convert(built.checkpoint(arch, **overrides), tmp_path / "store", bits=4))
    sizes = residents.gpu_bytes(store)
    assert sizes["float"] > sizes["int8"] > sizes["int4"]
    for fmt in residents.FORMATS:
        held = held_as(store, fmt)
        assert abs(sizes[fmt] - held) <= 0.01 * held, (fmt, sizes[fmt], held)


def quantized_model(store: Store, bits: int | None, as_read: bool):
    """A family's model over the store's residents quantized as a GPU load does it (here on the CPU): each float
    matrix as it is read (engine._quantize_as_read), or (as_read False) all read in float, then quantized after the
    family fused them; bits None: kept in float."""
    from flashmoe.engine import _quantize_as_read, _resident

    family = family_of(store.config.architecture)
    each = _quantize_as_read(lambda name: "cpu", bits, torch.bfloat16, getattr(family, "FLOAT_MATRICES", ()))
    loaded = store.load_resident(torch.bfloat16, float32=getattr(family, "FLOAT32_RESIDENTS", ()),
                                 each=each if as_read and bits else None)
    model = family.Model(store.config, {name: _resident(t, "cpu", torch.bfloat16) for name, t in loaded.items()})
    if bits:
        model.compress_matrices(lambda w: AffineMatrix.quantized(w, bits, torch.bfloat16, residents.GROUP))
        model.settle()
    return model


def same_weight(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return all(torch.equal(x, y) for x, y in zip((a.q.packed, a.q.scales, a.q.biases), (b.q.packed, b.q.scales,
                                                                                         b.q.biases)))


@pytest.mark.parametrize("arch,overrides", [("qwen3_5_moe", {}), ("qwen3_moe", {"tie_word_embeddings": True}),
                                            ("gpt_oss", {}), ("deepseek_v3", {}), ("glm4_moe", {}), ("mixtral", {}),
                                            ("minimax_m2", {}), ("qwen3_next", {})])
def test_residents_quantized_as_read_are_those_quantized_after_fusion(built, tmp_path, arch, overrides):
    """A GPU load quantizes each float matrix as it is read (RAM never holds the float residents at once): the
    same codes, bit for bit, as quantizing the family's fused matrices afterwards; DeepSeek-V3's kv_b absorbed from
    its float rows; a tied head its own copy."""
    store = Store(convert(built.checkpoint(arch, **overrides), tmp_path / "store", bits=4))
    new, old = quantized_model(store, 4, as_read=True), quantized_model(store, 4, as_read=False)
    assert new.w.keys() == old.w.keys()
    assert any(isinstance(w, AffineMatrix) for w in new.w.values())
    for name in new.w:
        assert type(new.w[name]) is type(old.w[name]) and same_weight(new.w[name], old.w[name]), name
    assert same_weight(new.lm_head, old.lm_head)


def test_the_store_hands_each_resident_over_as_it_is_read(built):
    """load_resident(each=...): each tensor reaches `each` right after it is read, the one before already gone
    (nothing else kept it): RAM holds one float tensor at a time, not the residents."""
    import weakref

    seen = []

    def each(name, t):
        assert all(ref() is None for ref in seen), name
        seen.append(weakref.ref(t))
        return t.shape

    shapes = Store(built.store("qwen3_5_moe", 4)).load_resident(torch.bfloat16, each=each)
    assert len(seen) == len(shapes) > 10 and all(isinstance(v, torch.Size) for v in shapes.values())


def test_a_gpu_load_takes_the_first_format_that_leaves_half_the_vram():
    sizes = {"float": 20 * GB, "int8": 11 * GB, "int4": 6 * GB}  # Qwen3.5-397B's, roughly
    assert residents.choose(sizes, 140 * GB) == "float"  # an H200
    assert residents.choose(sizes, 23 * GB) == "int8"  # a 24 GB card
    assert residents.choose(sizes, 15 * GB) == "int4"  # a 16 GB card: int4 leaves less than half, but enough
    assert residents.choose(sizes, 7 * GB) is None  # not even int4 with the headroom


def test_a_format_that_does_not_fit_is_refused_in_one_line_naming_one_that_does():
    sizes = {"float": 20 * GB, "int8": 11 * GB, "int4": 6 * GB}
    residents.check(sizes, "float", 40 * GB, "cuda:0")  # fits: nothing said
    with pytest.raises(FlashMoeError) as e:
        residents.check(sizes, "float", 15 * GB, "cuda:0")
    message = str(e.value)
    assert "\n" not in message and "20.0 GB as float" in message and "cuda:0 has 15.0 GB free" in message
    assert "--resident-format int8" in message and "int4 (6.0 GB)" in message
    with pytest.raises(FlashMoeError, match=r"--devices\) or run on the CPU"):
        residents.check(sizes, "int4", 7 * GB, "cuda:0")


@pytest.mark.gpu
def test_on_the_gpu_a_load_quantizes_residents_that_would_fill_the_vram(built, monkeypatch, capsys):
    """With little VRAM free (as residents.free_vram reports it: a GPU the size of the tiny model's residents, no
    headroom), a load with no resident_format quantizes the residents and says so; one that asks for float is
    refused before anything loads."""
    import flashmoe

    store = built.store("qwen3_5_moe", 4)
    sizes = residents.gpu_bytes(Store(store))
    free = sizes["float"] + 1  # float fits, but not in half of it
    monkeypatch.setattr(residents, "HEADROOM", 0)
    monkeypatch.setattr(residents, "free_vram", lambda gpus: free)
    model = flashmoe.load(store, device="cuda", vram_cache_gb=0.01)
    assert model.resident_format == ("int8" if sizes["int8"] <= free // 2 else "int4")
    assert "resident weights quantized to" in capsys.readouterr().err
    model.close()
    monkeypatch.setattr(residents, "free_vram", lambda gpus: sizes["float"] - 1)
    with pytest.raises(FlashMoeError, match="as float"):
        flashmoe.load(store, device="cuda", resident_format="float")
