"""Triton expert kernels against their torch references, over awkward shapes and every bit width.

On the GPU they run compiled; on a CPU machine with triton installed they run in Triton's interpreter
(TRITON_INTERPRET=1, set in conftest), so CI checks the kernels' indexing too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import rel_error
from flashmoe import mxfp4
from flashmoe.convert import expert_tensors
from flashmoe.kernels import moe_triton as mt
from flashmoe.kernels.moe import ExpertMath, expert_biases, expert_weights, swiglu_mlp
from flashmoe.store import BlobLayout

pytestmark = pytest.mark.skipif(not mt.triton_available(), reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_slab(n_experts: int, hidden: int, inter: int, bits: int, group: int, seed: int,
              scale_dtype: torch.dtype = torch.float16, math: ExpertMath | None = None):
    """A slab of n_experts random quantized blobs (one per slot), its layout and kernel geometry; scales and biases
    in scale_dtype (bfloat16 as MLX imports have them; uint8: MXFP4 blobs, e8m0 scales and no biases). math: GPT-OSS's
    experts (output biases in the blob, the clamped SwiGLU)."""
    gen = torch.Generator().manual_seed(seed)
    blobs, layout = [], None
    for _ in range(n_experts):
        gate_up = torch.randn(2 * inter, hidden, generator=gen) * 0.05
        down = torch.randn(hidden, inter, generator=gen) * 0.05
        if scale_dtype == torch.uint8:
            tensors = {}
            for name, w in (("gate_up", gate_up), ("down", down)):
                tensors[f"{name}.packed"], tensors[f"{name}.scales"] = mxfp4.quantize(w)
        elif scale_dtype == torch.float32:  # FP8 experts kept: e4m3 codes, a float32 scale per row per group
            tensors = {}
            for name, w in (("gate_up", gate_up), ("down", down)):
                scale = w.abs().reshape(w.shape[0], -1, group).amax(-1) / 448
                codes = (w / scale.repeat_interleave(group, dim=1)).to(torch.float8_e4m3fn)
                tensors[f"{name}.packed"], tensors[f"{name}.scales"] = codes.view(torch.uint8), scale
        else:
            tensors = {k: v.to(scale_dtype) if v.is_floating_point() else v
                       for k, v in expert_tensors(gate_up, down, bits, group).items()}
        if math is not None and math.bias:
            tensors["gate_up.bias"] = torch.randn(2 * inter, generator=gen) * 0.3
            tensors["down.bias"] = torch.randn(hidden, generator=gen) * 0.3
        layout = layout or BlobLayout.for_tensors(tensors)
        blobs.append(torch.frombuffer(bytearray(layout.pack(tensors)), dtype=torch.uint8))
    slab = torch.stack(blobs).to(DEVICE)
    return slab, layout, mt.QuantBlob.from_layout(layout, bits, group, math)


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# (4, 320, 192, 64): rows whose last decode step is part masked, over whole groups (GPT-OSS's 2880 is such a width)
@pytest.mark.parametrize("bits,hidden,inter,group", [(4, 96, 80, 16), (2, 64, 48, 16), (8, 128, 64, 32), (4, 256, 128, 64),
                                                     (4, 512, 192, 64), (2, 512, 256, 32), (8, 256, 320, 64),
                                                     (4, 320, 192, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernels_match_reference(bits, hidden, inter, group, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's CPU interpreter converts float32 -> bf16 wrongly inside tl.dot; checked on the GPU")
    slab, layout, qb = make_slab(5, hidden, inter, bits, group, seed=bits + hidden)
    slots = i32([3, 0, 4])  # three experts, in slot-list order, one token
    x = torch.randn(1, hidden, device=DEVICE).to(dtype)
    token_of, expert_start = i32([0, 0, 0]), i32([0, 1, 2, 3])
    act = mt.gate_up_swiglu(x, slab, slots, token_of, expert_start, qb)
    act_ref = mt.reference_gate_up_swiglu(x, slab, slots, token_of, expert_start, layout, qb)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_error(act, act_ref) < tol
    assert mt.decode_supported(qb)
    assert rel_error(mt.decode_gate_up_swiglu(x, slab, slots, qb), act_ref) < tol
    weights = torch.rand(3, device=DEVICE)
    ref = mt.reference_down_weighted_sum(act_ref, slab, slots, weights, layout, qb)
    for split in (True, False):  # per (expert, chunk) partials then their sum; or one program per rows over all
        out = mt.down_weighted_sum(act_ref, slab, slots, weights, qb, split=split)
        assert out.shape == (hidden,) and rel_error(out, ref) < tol


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n_tokens", [3, 40])
def test_grouped_kernels_match_reference(bits, n_tokens):
    hidden, inter, group = 96, 48, 16
    slab, layout, qb = make_slab(4, hidden, inter, bits, group, seed=bits * n_tokens)
    gen = torch.Generator().manual_seed(n_tokens)
    x = torch.randn(n_tokens, hidden, generator=gen).to(DEVICE)
    # tokens grouped by expert: slot 2 gets most tokens, slot 1 exactly one, slot 0 none (empty run)
    groups = [[], [n_tokens - 1], list(range(0, n_tokens, 1)), list(range(0, n_tokens, 2))]
    order = [2, 1, 0, 3]  # slot of each group
    token_of = [t for g in groups for t in g]
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + len(g))
    slots, token_of_t, expert_start = i32(order), i32(token_of), i32(starts)
    act = mt.gate_up_swiglu(x, slab, slots, token_of_t, expert_start, qb)
    act_ref = mt.reference_gate_up_swiglu(x, slab, slots, token_of_t, expert_start, layout, qb)
    assert rel_error(act, act_ref) < 1e-4
    pair_weight = torch.rand(len(token_of), generator=gen).to(DEVICE)
    y = mt.down_grouped(act_ref, slab, slots, expert_start, pair_weight, qb)
    y_ref = mt.reference_down_grouped(act_ref, slab, slots, expert_start, pair_weight, layout, qb)
    assert rel_error(y, y_ref) < 1e-4


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_kernels_read_negative_slots_from_the_host_slab(bits):
    """Zero-copy: slot s < 0 is slot -1 - s of the pinned RAM slab (on a GPU the kernel reads it over PCIe)."""
    hidden, inter, group = 128, 64, 32
    slab, layout, qb = make_slab(6, hidden, inter, bits, group, seed=bits)
    vram, host = slab[:3].clone(), slab[3:].cpu()
    if DEVICE == "cuda":
        host = host.pin_memory()
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(bits)).to(DEVICE)
    mixed, plain = i32([1, -3, 0, -1]), i32([1, 5, 0, 3])  # the same four experts, two of them in host slots
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], device=DEVICE)
    act = mt.decode_gate_up_swiglu(x, vram, mixed, qb, host_slab=host)
    act_ref = mt.reference_gate_up_swiglu(x, slab, plain, i32([0] * 4), i32([0, 1, 2, 3, 4]), layout, qb)
    assert rel_error(act, act_ref) < 1e-4
    out = mt.down_weighted_sum(act_ref, vram, mixed, weights, qb, host_slab=host)
    routed = mt.reference_down_weighted_sum(act_ref, slab, plain, weights, layout, qb)
    assert rel_error(out, routed) < 1e-4
    # the layer's end in the same launch: residual + sigmoid(gate) * shared expert + routed experts
    residual, shared, gate = (torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in (hidden, hidden, 1))
    out = mt.down_weighted_sum(act_ref, vram, mixed, weights, qb, host_slab=host, epilogue=(residual, shared, gate))
    assert rel_error(out, residual + torch.sigmoid(gate) * shared + routed) < 1e-4
    # a shared expert without a gate (DeepSeek-V3), and none at all (Qwen3-MoE, Mixtral)
    out = mt.down_weighted_sum(act_ref, vram, mixed, weights, qb, host_slab=host, epilogue=(residual, shared, None))
    assert rel_error(out, residual + shared + routed) < 1e-4
    out = mt.down_weighted_sum(act_ref, vram, mixed, weights, qb, host_slab=host, epilogue=(residual, None, None))
    assert rel_error(out, residual + routed) < 1e-4
    out = mt.down_weighted_sum(act_ref, vram, mixed, weights, qb, host_slab=host, epilogue=(residual, shared, gate),
                               split=False)
    assert rel_error(out, residual + torch.sigmoid(gate) * shared + routed) < 1e-4


@pytest.mark.parametrize("bits,shared", [(4, "gated"), (8, "plain"), (2, "none")])
def test_decode_kernels_take_several_tokens_each_with_its_own_experts(bits, shared):
    """A batch of decode tokens in the same launches (per_row, tokens): pair e reads token e // K's row, and each
    token's partials are summed with its own residual, shared expert and gate (a strided column, as the router's
    fused projection leaves it): what each token gets alone."""
    hidden, inter, group, k = 128, 96, 32, 2
    slab, layout, qb = make_slab(5, hidden, inter, bits, group, seed=bits + 7)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, hidden, generator=gen).to(DEVICE)
    slots = i32([[3, 0], [4, 3], [1, 2]])
    weights = torch.rand(3, k, generator=gen).to(DEVICE)
    act = mt.decode_gate_up_swiglu(x, slab, slots.reshape(-1), qb, per_row=k)
    act_ref = mt.reference_gate_up_swiglu(x, slab, slots.reshape(-1), i32([0, 0, 1, 1, 2, 2]), i32(list(range(7))),
                                          layout, qb)
    assert rel_error(act, act_ref) < 1e-4
    residual = torch.randn(3, hidden, generator=gen).to(DEVICE)
    shared_out = torch.randn(3, hidden, generator=gen).to(DEVICE) if shared != "none" else None
    gate = torch.randn(3, 5, generator=gen).to(DEVICE)[:, -1:] if shared == "gated" else None  # stride 5
    partial = mt.down_partials(act, slab, slots.reshape(-1), weights.reshape(-1), qb)
    out = mt.sum_partials(partial, torch.float32, (residual, shared_out, gate), tokens=3)
    assert out.shape == (3, hidden)
    for t in range(3):
        routed = mt.reference_down_weighted_sum(act_ref[t * k : (t + 1) * k], slab, slots[t], weights[t], layout, qb)
        end = residual[t] + (0 if shared_out is None else
                             shared_out[t] * (1 if gate is None else torch.sigmoid(gate[t])))
        assert rel_error(out[t], routed + end) < 1e-4
        alone = mt.down_weighted_sum(act_ref[t * k : (t + 1) * k], slab, slots[t], weights[t], qb,
                                     epilogue=(residual[t], None if shared_out is None else shared_out[t],
                                               None if gate is None else gate[t].reshape(-1)))
        assert rel_error(out[t], alone) < 1e-5


@pytest.mark.parametrize("bits,bias", [(4, False), (8, True)])
def test_skipped_slots_read_nothing_and_the_cpu_row_joins_the_sum(bits, bias):
    """cpu_share.py's decode step: slots SKIP read no weights and contribute exact zeros (their act is zeros, which
    the down projection multiplies by its masked-out weights), and an extra row (the CPU's sum, in pinned RAM) is
    summed with the partials and the layer's end."""
    hidden, inter, group = 128, 96, 32
    math = ExpertMath(bias=True, limit=7.0, alpha=1.702) if bias else None
    slab, layout, qb = make_slab(5, hidden, inter, bits, group, seed=bits, math=math)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(1, hidden, generator=gen).to(DEVICE)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], device=DEVICE)
    skipped, kept = i32([4, mt.SKIP, 1, mt.SKIP]), i32([4, 1])
    act = mt.decode_gate_up_swiglu(x, slab, skipped, qb)
    assert torch.equal(act[[1, 3]], torch.zeros(2, inter, device=DEVICE))
    act_ref = mt.reference_gate_up_swiglu(x, slab, kept, i32([0, 0]), i32([0, 1, 2]), layout, qb)
    assert rel_error(act[[0, 2]], act_ref) < 1e-4
    partial = mt.down_partials(act, slab, skipped, weights, qb)
    cpu_row = torch.randn(hidden, generator=gen)
    if DEVICE == "cuda":
        cpu_row = cpu_row.pin_memory()  # read by the kernel where it lies
    residual, shared, gate = (torch.randn(n, generator=gen).to(DEVICE) for n in (hidden, hidden, 1))
    out = mt.sum_partials(partial, torch.float32, (residual, shared, gate), extra=cpu_row)
    cpu_row = cpu_row.to(DEVICE)
    routed = mt.reference_down_weighted_sum(act_ref, slab, kept, weights[[0, 2]], layout, qb)
    assert rel_error(out, residual + torch.sigmoid(gate) * shared + routed + cpu_row) < 1e-4
    one_launch = mt.down_weighted_sum(act, slab, skipped, weights, qb, split=False)
    assert rel_error(one_launch, routed) < 1e-4


@pytest.mark.parametrize("hidden,inter,experts", [(4096, 1024, 4), (4096, 1536, 8), (4096, 14336, 2), (96, 96, 3)])
def test_down_split_covers_the_intermediate_in_whole_steps(hidden, inter, experts):
    qb = mt.QuantBlob(hidden, inter, 4, 32, 0, 0, 0, 0, 0, 0, 0)
    block_b = mt.gemv_block_bytes(qb, inter, 512)
    chunk, chunks = mt.down_split(qb, experts, 8, block_b)
    step = block_b * 2
    assert chunk % step == 0 and (chunks - 1) * chunk < inter <= chunks * chunk
    assert chunks == 1 or -(-hidden // 8) * experts * (chunks - 1) < mt.DOWN_PROGRAMS  # no more chunks than it needs


def test_decode_step_covers_whole_groups():
    qb = lambda bits, group, hidden, inter: mt.QuantBlob(hidden, inter, bits, group, 4096, 0, 0, 0, 0, 0, 0)  # noqa: E731
    assert mt.gemv_block_bytes(qb(4, 64, 4096, 1024), 4096) == 512  # 397B: four cache lines of each row per step
    assert mt.gemv_block_bytes(qb(4, 64, 4096, 1024), 4096, most=128) == 128
    assert mt.gemv_block_bytes(qb(4, 64, 4096, 1536), 1536) == 256  # Qwen3-235B's down: an even step of 256 bytes
    # GPT-OSS's 2880: only 32-byte steps divide it; 512-byte ones, the last masked, serve
    assert mt.gemv_block_bytes(qb(4, 64, 2880, 2880), 2880) == 512 and not mt.gemv_even(qb(4, 64, 2880, 2880), 2880, 512)
    assert mt.gemv_block_bytes(qb(4, 16, 96, 80), 80) == 32  # no step past the row itself
    assert not mt.decode_supported(qb(4, 24, 96, 72))  # 12-byte groups: the grouped kernels serve decode


def test_block_k_never_straddles_a_group():
    for group, block in [(64, 64), (32, 32), (128, 128), (256, 128), (96, 32), (24, 8)]:
        qb = mt.QuantBlob(64, 64, 4, group, 4096, 0, 0, 0, 0, 0, 0)
        assert qb.block_k == block and group % qb.block_k == 0
    assert not mt.QuantBlob(64, 64, 4, 24, 4096, 0, 0, 0, 0, 0, 0).supported


@pytest.mark.parametrize("bits,scale_dtype,kind", [(4, torch.bfloat16, 1), (8, torch.bfloat16, 1), (4, torch.uint8, 2),
                                                    (8, torch.float32, 3)])
def test_kernels_read_bfloat16_scales_and_mxfp4(bits, scale_dtype, kind):
    hidden, inter, group = 128, 64, 32
    slab, layout, qb = make_slab(3, hidden, inter, bits, group, seed=bits, scale_dtype=scale_dtype)
    assert qb.scale_kind == kind
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(bits)).to(DEVICE)
    slots, token_of, expert_start = i32([2, 0]), i32([0, 1, 1]), i32([0, 1, 3])
    act = mt.gate_up_swiglu(x, slab, slots, token_of, expert_start, qb)
    act_ref = mt.reference_gate_up_swiglu(x, slab, slots, token_of, expert_start, layout, qb)
    assert rel_error(act, act_ref) < 1e-4
    one = mt.decode_gate_up_swiglu(x[:1], slab, slots, qb)
    assert rel_error(one, mt.reference_gate_up_swiglu(x[:1], slab, slots, i32([0, 0]), i32([0, 1, 2]), layout, qb)) < 1e-4
    weights = torch.rand(2, device=DEVICE)
    out = mt.down_weighted_sum(one, slab, slots, weights, qb)
    assert rel_error(out, mt.reference_down_weighted_sum(one, slab, slots, weights, layout, qb)) < 1e-4


GPT_OSS = ExpertMath(bias=True, limit=0.3, alpha=1.702)  # a limit the random gates cross


@pytest.mark.parametrize("bits,hidden,inter,group", [(4, 96, 80, 16), (8, 128, 64, 32)])
def test_gpt_oss_experts_biases_and_clamped_swiglu_in_every_kernel(bits, hidden, inter, group):
    slab, layout, qb = make_slab(5, hidden, inter, bits, group, seed=7, math=GPT_OSS)
    assert qb.bias and qb.act == 1
    # the reference is the model's own torch path: weights dequantized, biases added, the clamped SwiGLU
    x = torch.randn(1, hidden, device=DEVICE) * 4
    slots, weights = i32([3, 0, 4]), torch.rand(3, device=DEVICE)
    act_ref = mt.reference_gate_up_swiglu(x, slab, slots, i32([0, 0, 0]), i32([0, 1, 2, 3]), layout, qb)
    ref = mt.reference_down_weighted_sum(act_ref, slab, slots, weights, layout, qb)
    by_torch = 0
    for k, slot in enumerate(slots.tolist()):
        views = layout.unpack(slab[slot])
        by_torch = by_torch + weights[k] * swiglu_mlp(x, *expert_weights(views, bits, group, torch.float32), GPT_OSS,
                                                      expert_biases(views, torch.float32))[0]
    assert rel_error(ref, by_torch) < 1e-5
    gate = torch.nn.functional.linear(x, expert_weights(layout.unpack(slab[3]), bits, group, torch.float32)[0])[0, :inter]
    assert (gate > GPT_OSS.limit).any()  # the clamp is reached
    # decode: gate_up, then down (split and not)
    assert rel_error(mt.decode_gate_up_swiglu(x, slab, slots, qb), act_ref) < 1e-4
    for split in (True, False):
        assert rel_error(mt.down_weighted_sum(act_ref, slab, slots, weights, qb, split=split), ref) < 1e-4
    # many tokens, grouped by expert
    xs = torch.randn(7, hidden, device=DEVICE) * 4
    token_of, expert_start = i32([0, 1, 2, 3, 4, 5, 6, 0, 2, 4]), i32([0, 7, 7, 10])
    act = mt.gate_up_swiglu(xs, slab, slots, token_of, expert_start, qb)
    act_ref = mt.reference_gate_up_swiglu(xs, slab, slots, token_of, expert_start, layout, qb)
    assert rel_error(act, act_ref) < 1e-4
    pair_weight = torch.rand(10, device=DEVICE)
    y = mt.down_grouped(act_ref, slab, slots, expert_start, pair_weight, qb)
    assert rel_error(y, mt.reference_down_grouped(act_ref, slab, slots, expert_start, pair_weight, layout, qb)) < 1e-4


PROMPT_TILES = [mt.PromptTile(block_t=16, block_n=16, block_k=32, swap=True),  # swapped, one group a step
                mt.PromptTile(block_t=16, block_n=32, block_k=128),  # whole groups a step (WIDE)
                mt.PromptTile(block_t=32, block_n=16, block_k=64, swap=True, num_stages=2),  # both
                mt.PromptTile(block_t=16, block_n=16, block_k=128, split=True)]  # a product per bit position


@pytest.mark.parametrize("tile", range(len(PROMPT_TILES)))
@pytest.mark.parametrize("bits,scale_dtype,math", [(4, torch.float16, None), (2, torch.float16, None),
                                                   (8, torch.bfloat16, None),
                                                   (4, torch.uint8, None), (8, torch.float32, None),
                                                   (4, torch.float16, GPT_OSS)])
def test_every_prompt_tile_matches_reference(tile, bits, scale_dtype, math):
    """The grouped kernels' tiles (PromptTile: swapped operands, K steps over several groups, a product per bit
    position) give the reference for every bit width, scale kind and GPT-OSS's math; experts with no pairs, fewer than a tile and more than one."""
    hidden, inter, group = 256, 128, 32
    slab, layout, qb = make_slab(4, hidden, inter, bits, group, seed=bits + tile, scale_dtype=scale_dtype, math=math)
    gen = torch.Generator().manual_seed(tile)
    x = (torch.randn(40, hidden, generator=gen) * 2).to(DEVICE)
    groups = [list(range(0, 40, 3)), [], [5], list(range(40))]  # 14, 0, 1 and 40 pairs
    token_of = i32([t for g in groups for t in g])
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + len(g))
    slots, expert_start = i32([1, 3, 0, 2]), i32(starts)
    act = mt.gate_up_swiglu(x, slab, slots, token_of, expert_start, qb, tile=PROMPT_TILES[tile])
    act_ref = mt.reference_gate_up_swiglu(x, slab, slots, token_of, expert_start, layout, qb)
    assert rel_error(act, act_ref) < 1e-4
    pair_weight = torch.rand(starts[-1], generator=gen).to(DEVICE)
    y = mt.down_grouped(act_ref, slab, slots, expert_start, pair_weight, qb, tile=PROMPT_TILES[tile])
    assert rel_error(y, mt.reference_down_grouped(act_ref, slab, slots, expert_start, pair_weight, layout, qb)) < 1e-4


def test_prompt_k_step_is_whole_groups_dividing_the_row():
    qb = mt.QuantBlob(2880, 2880, 4, 32, 4096, 0, 0, 0, 0, 0, 0)
    assert mt.prompt_block_k(qb, 4096, 128) == 128  # four groups a step
    assert mt.prompt_block_k(qb, 2880, 128) == 64  # 2880 = 45 x 64
    assert mt.prompt_block_k(qb, 160, 128) == 32  # 5 groups: one at a time
    assert mt.prompt_block_k(qb, 4096, 16) == 16  # within a group
    assert mt.prompt_block_k(mt.QuantBlob(64, 64, 8, 128, 4096, 0, 0, 0, 0, 0, 0), 7168, 256) == 256


def test_a_prompts_tiles_are_made_once_for_both_launches():
    """A layer's gate_up and down launches ask for the same large tile layout: the second gets the first's tensors;
    another layout gets its own."""
    starts = list(range(0, 10 * 513, 10))  # 512 experts of 10 pairs
    first = mt._tiles(starts, 16, torch.device(DEVICE))
    assert mt._tiles(starts, 16, torch.device(DEVICE))[0] is first[0]
    other = mt._tiles(starts[:-1] + [starts[-1] + 7], 16, torch.device(DEVICE))
    assert other[0] is not first[0] and other[0].numel() == 513 and other[1][-1].item() == 5126  # 17 pairs: 2 tiles
