"""x @ w^T for a resident weight, whatever form it is kept in: a tensor, or a matrix that multiplies itself (a
quantized one, kernels/affine.py; a compressed CPU form, kernels/cpu_int4.py). The model reads its weights only
through these."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .affine import AffineMatrix, RowStack


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    return F.linear(x, weight) if isinstance(weight, torch.Tensor) else weight(x)


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    return F.embedding(ids, weight) if isinstance(weight, torch.Tensor) else weight.rows(ids)


def is_matrix(weight) -> bool:
    """A weight `linear` multiplies by: a 2-D tensor or a self-multiplying form."""
    return weight.dim() == 2 if isinstance(weight, torch.Tensor) else callable(weight)


def _scheme(weight) -> tuple:
    if isinstance(weight, torch.Tensor):
        return ("tensor", weight.dtype)
    if isinstance(weight, AffineMatrix):
        return ("affine", *weight.scheme)
    return ("other", id(weight))


def cat_rows(weights: list):
    """Matrices that read one input, as one: a tensor when all are tensors, one AffineMatrix when all share a scheme,
    else a RowStack of runs that do (each run one product)."""
    runs: list[list] = []
    for w in weights:
        if runs and _scheme(runs[-1][0]) == _scheme(w) and _scheme(w)[0] != "other":
            runs[-1].append(w)
        else:
            runs.append([w])
    merged = [torch.cat(run) if isinstance(run[0], torch.Tensor) else AffineMatrix.cat(run) if len(run) > 1 else run[0]
              for run in runs]
    return merged[0] if len(merged) == 1 else RowStack(merged)


def held_bytes(root) -> int:
    """Bytes of tensor memory reachable from `root` (a model's weights in whatever forms they are kept: tensors,
    quantized matrices whose parts are views of one buffer, stacks of them), each storage counted once. Walks
    containers and instances' attributes, not classes, modules or functions."""
    storages, seen, total, stack = set(), set(), 0, [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total
