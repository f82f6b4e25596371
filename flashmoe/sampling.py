"""Choosing the next token from logits: greedy, or temperature with top-k and top-p (nucleus) filtering."""

from __future__ import annotations

from typing import Protocol

import torch


class TokenConstraint(Protocol):
    """A grammar over the output (grammar.py): masks each step's logits, then advances on the chosen token."""

    def mask(self, logits: torch.Tensor) -> None: ...

    def accept(self, token: int) -> None: ...

    @property
    def finished(self) -> bool: ...


# the first candidate set top-p looks in on a CPU; each miss widens it this many times (a sort of the whole
# vocabulary, the old way, took 17-38 ms a token for a 248k vocabulary on a CPU core; a top-k of 64 takes 0.6). A GPU
# sorts the whole vocabulary at once: each widening waits for it (H200, 248k, top-p 0.95: 1.14 ms widening, 0.42
# sorting, benchmarks/sampling.py)
FIRST_CANDIDATES, WIDEN = 64, 8


def distribution(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What sample() draws from at temperature > 0: (token ids, their weights, not normalised), or (None, a weight
    per token of the vocabulary) when nothing is cut. top_k keeps the k largest logits; top_p then keeps the fewest
    of those (largest first) that hold top_p of their probability (the first always stays); on a GPU the ids
    cut by top_p stay, with weight 0 (no wait for their number)."""
    z = logits.float() / temperature
    vocab = z.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and top_p >= 1.0:
        return None, torch.exp(z - z.max())
    # the mass top_p counts is the kept tokens' (all of them without top_k; the top k with it)
    total = torch.exp(z - z.max()).sum() if k == vocab else None
    n = k if k < vocab or z.is_cuda else min(FIRST_CANDIDATES, vocab)
    while True:
        values, ids = torch.topk(z, n) if n < vocab else torch.sort(z, descending=True)
        weights = torch.exp(values - values[0])  # values[0] is z's largest: `total`'s scale
        if top_p >= 1.0:
            return ids, weights
        mass = weights / (weights.sum() if total is None else total)
        before = torch.cumsum(mass, 0) - mass  # the mass of the tokens ahead of each
        if n == k or float(before[-1] + mass[-1]) >= top_p:  # the cut lies inside these n
            keep = before < top_p
            keep[0] = True
            return (ids, weights * keep) if z.is_cuda else (ids[keep], weights[keep])
        n = min(n * WIDEN, k)


def reference_distribution(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0
                           ) -> torch.Tensor:
    """distribution()'s reference, the way sample() once worked: the whole vocabulary sorted; probabilities [vocab]."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> int:
    """logits: [vocab] float, on any device (`generator` on the same one). temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    ids, weights = distribution(logits, temperature, top_p, top_k)
    # inverse transform: the first token whose running weight passes a uniform draw (multinomial over a 248k
    # vocabulary took 4.7 ms on a CPU core, this 0.4)
    running = torch.cumsum(weights, 0)
    u = torch.rand(1, generator=generator, device=weights.device) * running[-1]
    last = torch.searchsorted(running, running[-1:])  # the last token of non-zero weight (u may round up to the total)
    pick = torch.minimum(torch.searchsorted(running, u, right=True), last)
    return int(pick[0] if ids is None else ids[pick[0]])
