"""What the resident weights take on a GPU in each format, and the format a load picks when none is asked for.

A GPU holds every resident weight (the token mixers' projections, routers, shared experts, embedding, head). A 397B
model's are 19.6 GB in bf16: more than a 16 GB GPU has, most of a 24 GB one, and what they take is VRAM the expert
cache does not get. Quantized at load (engine._quantize_as_read: each float matrix as it is read, so they never
reach the GPU nor wait in RAM together) they take about 9/16 (int8) or 5/16 (int4) of that, at +0.2% / +1.5%
perplexity on the shipped model (RESULTS.md).
"""

from __future__ import annotations

import math

from safetensors import safe_open

from .errors import FlashMoeError
from .models import family_of
from .placement import EMBEDDING
from .store import Store, quantized_parts

GROUP = 32  # load's resident quantization: group 32, an fp16 scale and bias a group (bits + 1 per weight)
BITS = {"int8": 8, "int4": 4}
FORMATS = ("float", "int8", "int4")  # the order a load tries them in: exact first
HEADROOM = 2 << 30  # VRAM a load keeps beside the residents at the least: activations, graphs' pools, the first KV


def quantized_at_load(name: str, ndim: int, floating: bool, float_matrices: tuple[str, ...]) -> bool:
    """Whether a GPU load quantizes this resident tensor (rows the group does not divide aside): a float matrix,
    not the embedding (a lookup table) nor one of the family's FLOAT_MATRICES."""
    return ndim == 2 and floating and not name.startswith(EMBEDDING) and not name.endswith(float_matrices)


def gpu_bytes(store: Store, float_bytes: int = 2) -> dict[str, int]:
    """Bytes of the resident weights on a GPU per format: "float" in floats of `float_bytes`; "int8" / "int4" with
    every float matrix but the embedding quantized as load does it (rows the group does not divide stay float; a
    tied head gets its own quantized copy; a family's FLOAT_MATRICES stay float). Matrices the store keeps quantized
    (MLX imports) count as stored. From the resident files' headers: nothing is read."""
    kept = {part for name in store.resident_quantized for part in quantized_parts(name)}
    always_float = getattr(family_of(store.config.architecture), "FLOAT_MATRICES", ())
    fixed, matrices = 0, []  # bytes whatever the format; (rows, cols) of the float matrices load may quantize
    embedding = None
    for file in store.manifest["resident"]["files"]:
        with safe_open(str(store.path / file), "pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                shape, dtype = view.get_shape(), view.get_dtype()
                numel = math.prod(shape)
                is_float = dtype in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
                if key in kept or not is_float:
                    fixed += numel * _itemsize(dtype)
                elif quantized_at_load(key, len(shape), True, always_float):
                    matrices.append(tuple(shape))
                else:
                    fixed += numel * float_bytes
                    if key.startswith(EMBEDDING) and len(shape) == 2:
                        embedding = tuple(shape)
    head = embedding if store.config.tie_word_embeddings else None  # float: the embedding itself; else its own copy
    sizes = {"float": fixed + sum(r * c for r, c in matrices) * float_bytes}
    for fmt, bits in BITS.items():
        sizes[fmt] = fixed + sum(r * c * (bits + 1) // 8 if c % GROUP == 0 else r * c * float_bytes
                                 for r, c in matrices)
        if head is not None and head[1] % GROUP == 0:
            sizes[fmt] += head[0] * head[1] * (bits + 1) // 8
    return sizes


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(
        dtype, 1)


def free_vram(gpus) -> int:
    """Bytes free on these GPUs together, as the driver reports them now."""
    import torch

    return sum(torch.cuda.mem_get_info(d)[0] for d in gpus)


def choose(sizes: dict[str, int], free: int) -> str | None:
    """The format a load takes when none is asked for: the first of FORMATS whose residents take at most half of
    the `free` VRAM (the other half for the expert cache and the KV cache); else the smallest that leaves HEADROOM;
    None when none does."""
    for fmt in FORMATS:
        if sizes[fmt] <= free // 2:
            return fmt
    return "int4" if sizes["int4"] <= free - HEADROOM else None


def check(sizes: dict[str, int], fmt: str, free: int, where: str) -> None:
    """One line, before anything is loaded, when the residents in `fmt` would not fit the `free` VRAM of `where`
    with HEADROOM beside them."""
    if sizes[fmt] <= free - HEADROOM:
        return
    smaller = [f"{f} ({sizes[f] / 1e9:.1f} GB)" for f in FORMATS[FORMATS.index(fmt) + 1:]
               if sizes[f] <= free - HEADROOM]
    hint = (f"pass --resident-format {smaller[0].split()[0]} (resident_format=; {', '.join(smaller)})" if smaller
            else "spread the layers over several GPUs (--devices) or run on the CPU (--device cpu)")
    raise FlashMoeError(f"the resident weights take {sizes[fmt] / 1e9:.1f} GB as {fmt} and {where} has "
                        f"{free / 1e9:.1f} GB free (with {HEADROOM / 2**30:.0f} GB kept for activations): {hint}")
