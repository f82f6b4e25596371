"""Which cached expert to give up when a new one needs its slot: eviction policies behind one interface.

A policy sees the cache's traffic (hit, insert, remove, and `tick` at the end of each token) and names a victim
among the keys it holds that the caller has not locked (experts in use by the layer being computed). Policies
only order keys; the slots are the cache's. benchmarks/cache_sim.py replays routing traces against each of them
and against Belady's optimal (the bound no policy can beat).

  LRU            the least recently used (what the caches use today)
  FrequencyLRU   lowest `count_weight * uses + last token used`: Flash-MoE's CUDA port (count_weight 10) reached ~95%
                 VRAM hits at 8.3% of the experts, against plain LRU's far fewer; uses are counted across evictions
  DecayedLFU     lowest use count, each use worth `decay` less per token since (frequency that forgets)
  ReuseFrequency lowest estimate of the chance of a use at the next token: uses so far (popularity), plus, for the
                 experts the latest token used, their layer's measured rate of reuse from one token to the next
                 (1-2.7 points over FrequencyLRU on the calibrated and the trained model's traces, RESULTS.md)
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

Key = Hashable


class EvictionPolicy(Protocol):
    def hit(self, key: Key) -> None: ...

    def insert(self, key: Key) -> None: ...

    def remove(self, key: Key) -> None: ...

    def victim(self, locked: Callable[[Key], bool]) -> Key | None: ...

    def tick(self) -> None: ...


class LRU:
    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()  # least recent first

    def hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, locked: Callable[[Key], bool]) -> Key | None:
        return next((k for k in self._order if not locked(k)), None)

    def tick(self) -> None:
        pass


class NoEviction:
    """For a cache with a slot for every key it can see: nothing is ever evicted, so no order is kept (a scored
    policy's heap push per hit was a fifth of a CPU decode layer's time outside the kernels)."""

    def hit(self, key: Key) -> None:
        pass

    insert = remove = hit

    def victim(self, locked: Callable[[Key], bool]) -> Key | None:
        return None

    def tick(self) -> None:
        pass


def policy_for(name: str, slots: int, keys: int) -> EvictionPolicy:
    """POLICIES[name], or NoEviction when `slots` cached slots hold all `keys` keys the cache can be asked for."""
    return NoEviction() if slots >= keys else POLICIES[name]()


class _Scored:
    """Lowest score out first, through a heap whose stale entries (a key rescored since) are skipped lazily."""

    def __init__(self):
        self._score: dict[Key, float] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._order = itertools.count()  # ties go to the older entry

    def _set(self, key: Key, score: float, order: int | None = None) -> None:
        """`order` breaks ties (lower out first): by default, the order of the calls."""
        self._score[key] = score
        heapq.heappush(self._heap, (score, next(self._order) if order is None else order, key))
        if len(self._heap) > 4 * len(self._score) + 64:  # drop stale entries now and then
            self._heap = [(s, n, k) for s, n, k in self._heap if self._score.get(k) == s]
            heapq.heapify(self._heap)

    def remove(self, key: Key) -> None:
        self._score.pop(key, None)

    def victim(self, locked: Callable[[Key], bool]) -> Key | None:
        skipped, found = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            score, _, key = entry
            if self._score.get(key) != score:
                continue  # stale
            skipped.append(entry)
            if not locked(key):
                found = key
                break
        for entry in skipped:  # the victim stays until the caller removes it
            heapq.heappush(self._heap, entry)
        return found


class FrequencyLRU(_Scored):
    def __init__(self, count_weight: float = 10.0):
        super().__init__()
        self.count_weight = count_weight
        self._uses: dict[Key, int] = {}
        self._token = 0

    def _use(self, key: Key) -> None:
        self._uses[key] = self._uses.get(key, 0) + 1
        self._set(key, self.count_weight * self._uses[key] + self._token)

    hit = insert = _use

    def tick(self) -> None:
        self._token += 1


class DecayedLFU(_Scored):
    """Scores are kept inflated by 1/decay^token, so one token's decay needs no pass over every key; they are
    scaled back down before they overflow."""

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = decay
        self._worth = 1.0  # what a use adds now, in the inflated units

    def _use(self, key: Key) -> None:
        self._set(key, self._score.get(key, 0.0) + self._worth)

    hit = insert = _use

    def tick(self) -> None:
        self._worth /= self.decay
        if self._worth > 1e200:
            scale = self._worth
            self._worth = 1.0
            self._score = {k: s / scale for k, s in self._score.items()}
            self._heap = [(s, n, k) for n, (k, s) in enumerate(self._score.items())]
            heapq.heapify(self._heap)


class ReuseFrequency(_Scored):
    """Score = uses + reuse_weight x the key's layer's reuse rate x tokens so far, the second term only while the latest
    token used the key. Divided by the tokens, that is the chance of a use at the next token: popularity (uses per
    token) plus the reuse a token makes of its predecessor's experts (the share of a token's picks that the token
    before also picked, counted per layer as the cache runs: 29.5% at Qwen3.5-397B's K=4, 25-68% in the trained small
    model). Keys are (layer, expert); any other key is its own layer's. reuse_weight: 1.0 would be the plain estimate,
    but the measured reuse counts popular experts' repeats twice; 0.1 did best on the calibrated 397B traces (0.3-0.4
    points over 0.25 at K=10 and 5%), within 0.3 points of the best (0.25) on the trained model's (RESULTS.md)."""

    def __init__(self, reuse_weight: float = 0.1):
        super().__init__()
        self.reuse_weight = reuse_weight
        self._uses: dict[Key, int] = {}  # counted across evictions
        self._last: dict[Key, int] = {}  # each key's last use, in _order's count: ties go to the older
        self._tokens = 0
        self._now: dict[Key, None] = {}  # keys used at this token
        self._before: dict[Key, None] = {}  # and at the token before
        self._picks: dict[Hashable, list[int]] = {}  # layer -> [picks, picks the token before also made]

    def _use(self, key: Key) -> None:
        layer = key[0] if isinstance(key, tuple) else key
        counts = self._picks.setdefault(layer, [0, 0])
        if key not in self._now:
            self._now[key] = None
            counts[0] += 1
            counts[1] += key in self._before
        self._uses[key] = self._uses.get(key, 0) + 1
        self._last[key] = next(self._order)
        self._set(key, self._uses[key] + self.reuse_weight * counts[1] / counts[0] * max(self._tokens, 1),
                  self._last[key])

    hit = insert = _use

    def tick(self) -> None:
        self._tokens += 1
        for key in self._before:  # no longer the latest token's: popularity alone, ties by the last use
            if key not in self._now and self._score.get(key, self._uses[key]) != self._uses[key]:
                self._set(key, self._uses[key], self._last[key])
        self._before, self._now = self._now, {}


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRU, "frequency-lru": FrequencyLRU,
                                                      "decayed-lfu": DecayedLFU, "reuse-frequency": ReuseFrequency}


def _groups(trace):
    """(token, the keys one layer's step uses at once) in the order the engine asks for them."""
    tokens, layers, _ = trace.shape
    for t in range(tokens):
        for layer in range(layers):
            yield t, [(layer, int(e)) for e in trace[t, layer]]


def replay(trace, capacity: int, policy: EvictionPolicy, count_from: int = 0) -> int:
    """Hits of a cache of `capacity` experts (one budget over all layers) run by `policy` over a routing trace
    [tokens, layers, K], counted from token `count_from` on (the tokens before warm the cache). A layer's K experts
    are in use together: none of them is evicted for another."""
    cached: set = set()
    hits, token = 0, 0
    for t, keys in _groups(trace):
        if t != token:
            policy.tick()
            token = t
        group = set(keys)
        for key in keys:
            if key in cached:
                hits += t >= count_from
                policy.hit(key)
                continue
            if len(cached) >= capacity:
                victim = policy.victim(lambda k: k in group)
                if victim is None:  # every slot in use by this step: read into a staging slot, cache nothing
                    continue
                cached.discard(victim)
                policy.remove(victim)
            cached.add(key)
            policy.insert(key)
    return hits


def optimal_hits(trace, capacity: int, count_from: int = 0) -> int:
    """Belady's bound: on a miss with the cache full, evict the expert whose next use is farthest away (hits counted
    from token `count_from` on, as replay's)."""
    first = count_from * trace.shape[1]  # the first step counted
    accesses = [(i, key) for i, (_, keys) in enumerate(_groups(trace)) for key in keys]
    never = len(accesses)
    next_use = [never] * len(accesses)
    last_seen: dict = {}
    for j in range(len(accesses) - 1, -1, -1):  # the next step that uses the same key
        step, key = accesses[j]
        next_use[j] = last_seen.get(key, never)
        last_seen[key] = step
    cached: dict = {}  # key -> its next use
    heap: list = []  # (-next use, key), lazily stale
    hits, group = 0, set()
    for j, (step, key) in enumerate(accesses):
        if j == 0 or accesses[j - 1][0] != step:
            group = {k for s, k in accesses[j : j + trace.shape[2]] if s == step}
        if key in cached:
            hits += step >= first
        elif len(cached) >= capacity:
            skipped, victim = [], None
            while heap:
                entry = heapq.heappop(heap)
                if cached.get(entry[1]) != -entry[0]:
                    continue  # stale
                if entry[1] in group:  # in use by this step
                    skipped.append(entry)
                    continue
                victim = entry[1]
                break
            for entry in skipped:
                heapq.heappush(heap, entry)
            if victim is None:
                continue
            del cached[victim]
        cached[key] = next_use[j]
        heapq.heappush(heap, (-next_use[j], key))
    return hits
