"""Routing traces: which experts each token chose in each MoE layer, as an int array [tokens, layers, K].

Random-weight models route uniformly, the worst case for any cache; trained ones route with skew and reuse. Until
a trained model's own traces exist, `calibrated_trace` makes traces with the statistics published for
Qwen3.5-397B-A17B at K=4 (512 experts, 60 layers):
  - 29.5% of a layer's experts are reused from one token to the next;
  - over 27 tokens a layer uses 65 distinct experts at layer 0 and 37 at layer 30.
The generator: each layer has its own popularity (a Zipf law of exponent `skew` over a random order of the experts);
each of a token's K picks reuses one of the previous token's experts in that layer with probability `reuse`, else
draws from the popularity; no expert twice in a token. Both run linearly from the first layer's fit to the middle
layer's and stay there (the figures give layer 0 and layer 30 of 60 only). The fit, measured over 540 tokens:
  first layer  (reuse 0.28, skew 0.70): 29.6% reused, 64.6 distinct per 27 tokens (targets 29.5%, 65)
  middle layer (reuse 0.00, skew 1.45): 33.7% reused, 37.5 distinct per 27 tokens (targets 29.5%, 37)
At the middle layer the popularity alone that gives 37 distinct experts already repeats 33.7% from token to token
(the two published figures are not both reachable by this generator there; the distinct count, which decides the
hit rate, is kept). tests/test_traces.py holds the fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FlashMoeError

# (reuse, skew) fitted to the figures above by a grid search over both
FIRST_LAYER_FIT = (0.28, 0.70)
MIDDLE_LAYER_FIT = (0.0, 1.45)


@dataclass(frozen=True)
class TraceShape:
    tokens: int
    layers: int
    experts: int
    top_k: int


def uniform_trace(shape: TraceShape, seed: int = 0) -> np.ndarray:
    """What a random-weight router does: K distinct experts, uniformly, every token and layer."""
    rng = np.random.default_rng(seed)
    keys = rng.random((shape.tokens, shape.layers, shape.experts))
    return np.sort(np.argpartition(keys, shape.top_k, axis=-1)[..., : shape.top_k], axis=-1).astype(np.int32)


def layer_fit(layer: int, layers: int, first=FIRST_LAYER_FIT, middle=MIDDLE_LAYER_FIT) -> tuple[float, float]:
    """(reuse, skew) of a layer: from the first layer's fit to the middle layer's, then constant."""
    f = min(layer, layers // 2) / max(layers // 2, 1)
    return tuple(a + (b - a) * f for a, b in zip(first, middle))


def layer_popularity(experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """A layer's chance of picking each expert: a Zipf law of exponent `skew` over a random order of the experts."""
    popularity = np.arange(1, experts + 1, dtype=np.float64) ** -skew
    popularity = popularity[rng.permutation(experts)]
    return popularity / popularity.sum()


def skewed_layer(tokens: int, experts: int, top_k: int, skew: float, reuse: float,
                 rng: np.random.Generator, popularity: np.ndarray | None = None) -> np.ndarray:
    """One layer's picks [tokens, K] (see the module's docstring); `popularity`: the layer's, if given (several
    sequences of one model share it), else drawn here."""
    if popularity is None:
        popularity = layer_popularity(experts, skew, rng)
    out = np.empty((tokens, top_k), dtype=np.int32)
    previous: list[int] = []
    for t in range(tokens):
        chosen: list[int] = []
        candidates = list(previous)
        for _ in range(top_k):
            if candidates and rng.random() < reuse:
                pick = candidates.pop(rng.integers(len(candidates)))
            else:
                while True:  # a draw from the popularity, not yet chosen (rejection: K << experts)
                    pick = int(rng.choice(experts, p=popularity))
                    if pick not in chosen:
                        break
                if pick in candidates:
                    candidates.remove(pick)
            chosen.append(pick)
        out[t] = sorted(chosen)
        previous = chosen
    return out


def calibrated_trace(shape: TraceShape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(shape.layers):
        reuse, skew = layer_fit(i, shape.layers)
        layers.append(skewed_layer(shape.tokens, shape.experts, shape.top_k, skew, reuse, rng))
    return np.stack(layers, axis=1)


def calibrated_sequences(shape: TraceShape, sequences: int, seed: int = 0) -> np.ndarray:
    """Traces of `sequences` different sequences of one model, [sequences, tokens, layers, K]: each layer's popularity
    is the model's, shared by them all (what lets a batch's tokens share experts); their picks are their own."""
    rng = np.random.default_rng(seed)
    fits = [layer_fit(i, shape.layers) for i in range(shape.layers)]
    popularity = [layer_popularity(shape.experts, skew, rng) for _, skew in fits]
    return np.stack([np.stack([skewed_layer(shape.tokens, shape.experts, shape.top_k, skew, reuse, rng, p)
                               for (reuse, skew), p in zip(fits, popularity)], axis=1) for _ in range(sequences)])


def reuse_rate(layer_picks: np.ndarray) -> float:
    """The share of a token's experts that the previous token also used, over a layer's picks [tokens, K]."""
    shared = [len(set(a) & set(b)) for a, b in zip(layer_picks[1:], layer_picks[:-1])]
    return float(np.mean(shared)) / layer_picks.shape[1]


def distinct_per_window(layer_picks: np.ndarray, window: int = 27) -> float:
    """Distinct experts a layer used per `window` consecutive tokens, averaged over the windows."""
    counts = [len(np.unique(layer_picks[i : i + window])) for i in range(0, len(layer_picks) - window + 1, window)]
    return float(np.mean(counts))


def save(path: str | Path, trace: np.ndarray) -> None:
    np.save(Path(path), trace.astype(np.int32))


def load(path: str | Path) -> np.ndarray:
    trace = np.load(Path(path))
    if trace.ndim != 3 or not np.issubdtype(trace.dtype, np.integer):
        raise FlashMoeError(f"{path}: a routing trace is an integer array [tokens, layers, K], not {trace.dtype} "
                         f"{list(trace.shape)}")
    return trace
