"""CUDA graphs for decode: the fixed part of a layer replays as one launch instead of dozens.

A decode step of one MoE layer is ~60 small kernels (norms, projections, attention or the recurrence, the router,
the shared expert); launched from Python they cost far more host time than the GPU needs for them. Each such
layer gets two graphs, bound to one sequence's state tensors:

  front: x -> token mixing, MoE input norm, router, shared expert  (ids, weights, h, x, shared out)
  back:  the routed experts from their VRAM slots (a static slot buffer the host fills) + the residual

Between them the host reads the router's choice, fetches the experts (reads and copies) and writes
their slots: that is the part no graph can hold. Once every expert is in VRAM or pinned RAM (a model that fits),
the layer is one graph instead: the GPU looks the chosen experts' slots up in a resident table, and the host
never waits for the router. A layer with a KV cache (model.kv_cache) attends over the cache's whole capacity under
a mask, at a position read from the GPU, so its graphs hold while the cache has room; they are captured again
when it doubles. Graphs are captured at a sequence's second decode step, after an eager step has compiled every
kernel, and belong to that sequence's state.

With every expert resident on a one-device model, the whole step is one graph: embedding, every layer (dense ones
too) and the head. The host writes the token and position, replays and reads the logits: a 4-layer 35B-A3B-shaped
step on the H200 spent 0.65 ms of wall time on 0.47 ms of kernels with a graph per layer (the embedding, the head
and each layer's Python between them). Several sequences decoding together step as one graph too (batched_step),
one per batch size, reading their caches through a device table of addresses.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from .kernels import host_wait
from .layers.attention import KVCache
from .kernels.moe_triton import SKIP, to_device_int32
from .cpu_share import PROBE_AFTER, CpuShare
from .routed import ExpertTimes, RoutedExperts


_capture_streams: dict[int, torch.cuda.Stream] = {}


def capture_stream() -> torch.cuda.Stream:
    """A side stream on the current GPU to capture on. torch.cuda.graph's default is one stream made on whichever GPU
    was current at its first use, so a graph of another GPU's work would be captured on that one's stream (and its
    kernels launched there, on tensors they cannot reach)."""
    device = torch.cuda.current_device()
    if device not in _capture_streams:
        _capture_streams[device] = torch.cuda.Stream(device)
    return _capture_streams[device]


class Captured:
    """A CUDA graph of fn over static inputs; `outputs` are its static results."""

    def __init__(self, fn: Callable, inputs: list[torch.Tensor], pool):
        self.inputs = [t.clone() for t in inputs]
        self.graph = torch.cuda.CUDAGraph()
        # no garbage collection inside the capture: a model freed then (a cycle the collector finds) unregisters its
        # pinned slab, a CUDA call that invalidates the capture (seen when a failed test's models were collected).
        # Paused, not run first: a full collection in a serving process took 80-100 ms, and every new request's
        # sequence captures its graphs
        collecting = gc.isenabled()
        gc.disable()
        # capture_begin/end, not torch.cuda.graph: that one empties both of torch's caching allocators first (GPU
        # blocks, pinned host blocks), so every new request's first eager steps allocated them all again
        stream = capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                self.graph.capture_begin(pool=pool)
                try:
                    self.outputs = fn(*self.inputs)
                finally:
                    self.graph.capture_end()
        finally:
            if collecting:
                gc.enable()
        torch.cuda.current_stream().wait_stream(stream)

    def replay(self, *inputs: torch.Tensor):
        for static, new in zip(self.inputs, inputs):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.outputs


def table_row(state, layers: range) -> tuple[int, ...] | None:
    """The state's row of a batch's table: its layers' caches' addresses() one after the other, or None if a cache
    cannot say where it is. Kept on the state while its KV caches' capacities stay: a KV cache moves only when it
    grows (reserve), and recurrent states are made once and updated in place."""
    caches = [state.layers[layer] for layer in layers]
    if not all(hasattr(c, "addresses") for c in caches):
        return None
    key = tuple(c.capacity for c in caches if isinstance(c, KVCache))
    if state.addresses is None or state.addresses[0] != key:
        state.addresses = (key, tuple(a for c in caches for a in c.addresses()))
    return state.addresses[1]


def batch_table(rows: list[tuple[int, ...]], layers: int) -> torch.Tensor:
    """The sequences' table_rows as int64 [layers, sequences, 3]: entry [i] is layer i's table (mix_many's)."""
    return torch.tensor(rows, dtype=torch.long).view(len(rows), layers, 3).transpose(0, 1).contiguous()


class DecodeGraphs:
    def __init__(self, model, routed: RoutedExperts, experts_per_token: int, cpu_share: CpuShare | None = None):
        self.model, self.routed, self.k = model, routed, experts_per_token
        self.enabled = routed.decode_kernels
        self.cpu_share = cpu_share  # with experts in pinned RAM, the CPU computes part of them (cpu_share.py)
        self._timed = False  # this step is timed for the CPU share's choice (begin_step)
        self._captured = False  # this step captured graphs
        self.batch_graph = None  # (key, Captured): a batch's graph bound to its sequences (batched_step)
        self._batch_seen = None  # the key of the last such batch stepped eagerly
        self.bucket_graphs: dict[int, Captured] = {}  # batch size -> a graph for any sequences (batched_step)
        self._buckets_seen: set[int] = set()  # batch sizes stepped eagerly once
        self._blank = self._blank_row = None  # the padding rows' state and its addresses
        self.batch_captures = 0  # batch graphs captured so far

    def layer_can_use(self, layer: int) -> bool:
        return self.enabled and self.model.cfg.is_moe_layer(layer)

    def _capture(self, layer: int, x: torch.Tensor, state) -> tuple[Captured, Captured]:
        m, k = self.model, self.k

        def front(x):
            x, h = m.mix(layer, x, state, static=True)
            projections = m.moe_projections(layer, h)
            ids, weights, _ = m.route(layer, projections, k)
            return x, h, ids, weights, m.shared_expert_parts(layer, projections)

        pool = self._pool(state)
        front_graph = Captured(front, [x], pool)
        x_mid, h, ids, weights, (shared, shared_gate) = front_graph.outputs
        slots = torch.zeros(k, dtype=torch.int32, device=x.device)

        def back(slots):
            return self.routed.decode_compute(h, weights, slots, epilogue=(x_mid, shared, shared_gate))

        back_graph = Captured(back, [slots], pool)
        return front_graph, back_graph

    def _pool(self, state):
        """The sequence's graph memory pool, after the work queued so far is done. One pool per sequence: a pool
        shared across sequences would outlive its graphs, and capturing into a pool whose graphs were all freed
        trips an internal assert in torch's allocator (seen on 2.11). One per device, too: a model over several GPUs
        captures each block on its own."""
        torch.cuda.synchronize()
        self._captured = True  # this step's time says little of either way (begin_step)
        return state.decode_graphs.setdefault(("pool", torch.cuda.current_device()), torch.cuda.graph_pool_handle())

    def _resident_layer(self, layer: int, x: torch.Tensor, state, resident_slots: torch.Tensor) -> torch.Tensor:
        """A layer's decode step as graphs hold it with every expert resident (VRAM or pinned RAM): the GPU looks up
        the chosen experts' slots itself. A dense layer is its token mixing and MLP."""
        x, h = self.model.mix(layer, x, state, static=True)
        return self._resident_moe(layer, x, h, resident_slots, self.routed.decode_compute)

    def _resident_moe(self, layer: int, x: torch.Tensor, h: torch.Tensor, resident_slots: torch.Tensor, compute):
        """A resident layer after its token mixing: a dense MLP, or the router finding the experts' slots on the GPU
        and compute(h, weights, slots, epilogue) running them with the shared expert and residual in its epilogue
        (decode_compute for one token, decode_tokens for a batch)."""
        m = self.model
        if not m.cfg.is_moe_layer(layer):
            return x + m.dense_mlp(layer, h)
        projections = m.moe_projections(layer, h)
        _, weights, slots = m.route(layer, projections, self.k, resident_slots[layer],
                                    self.routed.fetcher.resident_counts)
        shared, shared_gate = m.shared_expert_parts(layer, projections)
        return compute(h, weights, slots, epilogue=(x, shared, shared_gate))

    def _capture_resident(self, layer: int, x: torch.Tensor, state, resident_slots: torch.Tensor) -> Captured:
        """The whole layer as one graph."""
        return Captured(lambda x: self._resident_layer(layer, x, state, resident_slots), [x], self._pool(state))

    def whole_step(self, token: int, state, layers: range) -> torch.Tensor | None:
        """One decode step of `token` through all of `layers` (the whole model, on this device) as one graph ->
        float32 logits [1, vocab] (a copy: the graph's own are overwritten by the next step). None where it does not
        apply: some expert is only on disk (the host must read the router's choice), or the CPU takes a share."""
        resident = self.routed.fetcher.resident_slots()
        if not self.enabled or resident is None or self.cpu_share is not None:
            return None
        m = self.model
        caches = [c for c in (m.kv_cache(state, layer) for layer in layers) if c is not None]
        for cache in caches:  # a graph is bound to the caches' tensors: growth recaptures
            cache.reserve(cache.length + 1, cache.k)
        capacities = tuple(cache.capacity for cache in caches)
        captured = state.decode_graphs.get("step")
        if captured is None or captured[0] != capacities:
            state.decode_graphs.pop("step", None)  # the old graph's memory back to the pool before the new capture

            def step(token):
                x = m.embed(token)
                for layer in layers:
                    x = self._resident_layer(layer, x, state, resident)
                return m.logits(x)

            token_t = torch.zeros(1, dtype=torch.long, device=resident.device)
            captured = state.decode_graphs["step"] = (capacities, Captured(step, [token_t], self._pool(state)))
        graph = captured[1]
        graph.inputs[0].fill_(token)  # a kernel with the id as its argument: no copy from the host
        logits = graph.replay().clone()
        for cache in caches:
            cache.length += 1
        return logits

    def batched_step(self, tokens: list[int], states: list, layers: range) -> torch.Tensor | None:
        """One decode step of several sequences (tokens[i] of states[i]) through all of `layers` as one graph ->
        float32 logits [len(states), vocab] (a copy), as whole_step for a batch: everything per token runs once over
        the batch's rows (weights read once for all), the attention and recurrences per sequence on its own
        caches, the experts as (token, expert) pairs. None where whole_step would not apply.

        Where every cache can say where it is (addresses(): KV caches, recurrent states), the graph holds no sequence:
        it reads their caches through a device table, a graph input, so one graph per batch size (a power of two,
        padding rows stepping a blank state) serves any set of sequences, whatever their caches' capacities: a
        request that comes or goes costs nothing but the table's copy. Otherwise (MLA's latent caches) the
        graph belongs to the set and their capacities, and one is kept. Either way a new graph first runs eagerly
        (compiling its kernels) and is captured at its second use. With a CPU share (cpu_share.py) the batch's
        graph reads every RAM-held expert over PCIe itself: the share is a lone sequence's."""
        resident = self.routed.fetcher.resident_slots()
        if not self.enabled or resident is None:
            return None
        m = self.model
        caches = [c for s in states for c in (m.kv_cache(s, layer) for layer in layers) if c is not None]
        for cache in caches:
            cache.reserve(cache.length + 1, cache.k)
        rows = [table_row(s, layers) for s in states]
        if all(r is not None for r in rows):
            logits = self._bucket_step(tokens, states, rows, layers, resident)
        else:
            logits = self._set_step(tokens, states, caches, layers, resident)
        for cache in caches:
            cache.length += 1
        return logits.clone()

    def _bucket_step(self, tokens: list[int], states: list, rows: list, layers: range, resident: torch.Tensor):
        m, n = self.model, len(states)
        bucket = 1 << (n - 1).bit_length()
        if self._blank is None:  # a padding row's state: one-position caches shaped as a real one's
            self._blank = [states[0].layers[layer].blank() for layer in layers]
            self._blank_row = tuple(a for c in self._blank for a in c.addresses())
        # pinned: the copies to the GPU are queued, never waited for (from pageable memory each took ~60 us)
        table = batch_table(rows + [self._blank_row] * (bucket - n), len(layers)).pin_memory()
        pad = [0] * (bucket - n)
        inputs = torch.tensor([tokens + pad, [s.position for s in states] + pad], dtype=torch.long).pin_memory()
        bounds = [(i, i + 1) for i in range(bucket)]

        def step(inputs, table):
            x = m.embed(inputs[0])
            for i, layer in enumerate(layers):
                x = self._resident_layers(layer, x, None, bounds, inputs[1], resident, table[i])
            return m.logits(x)

        graph = self.bucket_graphs.get(bucket)
        if graph is not None:
            return graph.replay(inputs, table)[:n]
        device = resident.device
        if bucket in self._buckets_seen:  # its second use: captured, in a pool of its own
            graph = self.bucket_graphs[bucket] = Captured(step, [inputs.to(device), table.to(device)], None)
            self.batch_captures += 1
            return graph.replay(inputs, table)[:n]
        self._buckets_seen.add(bucket)
        return step(inputs.to(device, non_blocking=True), table.to(device, non_blocking=True))[:n]

    def _set_step(self, tokens: list[int], states: list, caches: list, layers: range, resident: torch.Tensor):
        """batched_step for sequences whose caches cannot say where they are: a graph bound to them."""
        m = self.model
        key = (tuple(id(s) for s in states), tuple(cache.capacity for cache in caches))
        inputs = torch.tensor([tokens, [s.position for s in states]], dtype=torch.long).pin_memory()
        bounds = [(i, i + 1) for i in range(len(states))]

        def step(inputs):
            x = m.embed(inputs[0])
            for layer in layers:
                x = self._resident_layers(layer, x, states, bounds, inputs[1], resident)
            return m.logits(x)

        if self.batch_graph is not None and self.batch_graph[0] == key:
            return self.batch_graph[1].replay(inputs)
        if self._batch_seen == key:  # its second step: captured
            self.batch_graph = None  # the old graph's memory (and its sequences) go first
            graph = Captured(step, [inputs.to(resident.device)], None)  # a pool of its own: it goes with the graph
            self.batch_graph = (key, graph)
            self.batch_captures += 1
            return graph.replay(inputs)
        self._batch_seen = key
        return step(inputs.to(resident.device, non_blocking=True))

    def forget(self, state) -> None:
        """`state` is done: a batch graph bound to it goes (with the memory it holds)."""
        if self.batch_graph is not None and id(state) in self.batch_graph[0][0]:
            self.batch_graph = None
        if self._batch_seen is not None and id(state) in self._batch_seen[0]:
            self._batch_seen = None

    def _resident_layers(self, layer: int, x: torch.Tensor, states: list | None, bounds: list,
                         positions: torch.Tensor, resident_slots: torch.Tensor,
                         table: torch.Tensor | None = None) -> torch.Tensor:
        """_resident_layer for a batch of decode tokens, one per state (row i of x at device positions[i]); table:
        the layer's caches' addresses instead of the states."""
        x, h = self.model.mix_many(layer, x, states, bounds, positions, table)
        return self._resident_moe(layer, x, h, resident_slots, self.routed.decode_tokens)

    def _capture_shared(self, layer: int, x: torch.Tensor, state, resident_slots: torch.Tensor):
        """The layer as three graphs around the host's split of its RAM-held experts (cpu_share.py): front (to the
        router, staging h, weights and slots for the host), back (the GPU's experts, their slots read from the
        share's pinned buffer) and tail (the partials summed, then the CPU's sum read from pinned RAM, then the
        layer's end). Replays take no inputs: nothing is copied but the staged values."""
        m, k, share = self.model, self.k, self.cpu_share
        _, gpu_slots = share.buffers(k)

        def front(x):
            x, h = m.mix(layer, x, state, static=True)
            projections = m.moe_projections(layer, h)
            _, weights, slots = m.route(layer, projections, k, resident_slots[layer], self.routed.fetcher.resident_counts)
            shared, shared_gate = m.shared_expert_parts(layer, projections)
            staged = torch.cat([h[0].float(), weights[0].float(), slots[0].float()])
            return x, h, weights, shared, shared_gate, staged

        pool = self._pool(state)
        front_graph = Captured(front, [x], pool)
        x_mid, h, weights, shared, shared_gate, _ = front_graph.outputs
        gpu_slots.fill_(SKIP)  # nothing to read while capturing
        back_graph = Captured(lambda: self.routed.decode_partials(h, weights, gpu_slots), [], pool)
        partial = back_graph.outputs
        host_wait.wait_until(share.done, share.want)  # compiled outside the capture (it returns at once: done == want)

        def tail():
            host_wait.wait_until(share.done, share.want)  # the CPU's sum is in place
            return self.routed.decode_finish(partial, x.dtype, (x_mid, shared, shared_gate), share.cpu_sum)

        return front_graph, back_graph, Captured(tail, [], pool)

    def _step_shared(self, layer: int, x: torch.Tensor, state, capacity: int, timers: dict, times: ExpertTimes,
                     clock: Callable[[], float], resident: torch.Tensor) -> torch.Tensor:
        captured = state.decode_graphs.get(("shared", layer))
        if captured is None or captured[0] != capacity:
            captured = state.decode_graphs[("shared", layer)] = (
                capacity, self._capture_shared(layer, x, state, resident))
        front, back, tail = captured[1]
        share = self.cpu_share
        t0 = clock()
        share.receive(front.replay(x)[-1])  # the layer's one sync
        cache = self.model.kv_cache(state, layer)
        if cache is not None:
            cache.length += 1
        t1 = clock()
        take = share.split()
        share.compute(take)  # on the CPU's worker, while the GPU does its own experts and this thread queues on
        share.gpu_started()
        back.replay()
        share.gpu_queued()
        x = tail.replay()  # waits on the GPU for the worker's sum
        timers["attention_ms"] += (t1 - t0) * 1e3  # with graphs this holds the router and shared expert too
        times.compute_ms += (clock() - t1) * 1e3
        return x

    def begin_step(self, state) -> None:
        """A decode step of `state` through this block begins: with RAM-held experts among the resident ones, the
        CPU share (if any) picks this token's way and times it."""
        f, share = self.routed.fetcher, self.cpu_share
        self._timed = share is not None and f.resident_slots() is not None and f.resident_in_ram > 0
        self._captured = False
        if self._timed:
            first = min(f.layers)
            both = ("shared", first) in state.decode_graphs and ("resident", first) in state.decode_graphs
            share.begin_token(can_probe=both or state.decode_steps >= PROBE_AFTER)

    def end_step(self) -> None:
        if self._timed:  # a step that captured graphs is not counted: capturing costs far more than replaying
            self.cpu_share.end_token(counted=not self._captured)
            self._timed = False

    def uses_cpu_share(self) -> bool:
        """This token shares the layers' RAM-held experts with the CPU (cpu_share.py chose that way for it)."""
        return self._timed and self.cpu_share.sharing

    def step(self, layer: int, x: torch.Tensor, state, timers: dict, times: ExpertTimes,
             clock: Callable[[], float]) -> torch.Tensor:
        """One decode step of `layer` through its graphs (captured on first use for this state)."""
        resident = self.routed.fetcher.resident_slots()
        cache = self.model.kv_cache(state, layer)
        if cache is not None:  # the prefill allocated it; a graph is bound to its tensors, so growth recaptures
            cache.reserve(cache.length + 1, cache.k)
        capacity = cache.capacity if cache is not None else 0
        if resident is not None and self.uses_cpu_share():
            return self._step_shared(layer, x, state, capacity, timers, times, clock, resident)
        if resident is not None:
            captured = state.decode_graphs.get(("resident", layer))
            if captured is None or captured[0] != capacity:
                captured = state.decode_graphs[("resident", layer)] = (
                    capacity, self._capture_resident(layer, x, state, resident))
            graph = captured[1]
            t0 = clock()
            x = graph.replay(x)
            if cache is not None:
                cache.length += 1
            times.compute_ms += (clock() - t0) * 1e3  # the whole layer: mixing, router, shared and routed experts
            return x
        captured = state.decode_graphs.get(layer)
        if captured is None or captured[0] != capacity:
            captured = state.decode_graphs[layer] = (capacity, self._capture(layer, x, state))
        front, back = captured[1]
        t0 = clock()
        _, _, ids, _, _ = front.replay(x)
        if cache is not None:
            cache.length += 1
        t1 = clock()
        timers["attention_ms"] += (t1 - t0) * 1e3  # with graphs this holds the router and shared expert too
        chosen = sorted(ids[0].tolist())  # the one sync of the layer: the host needs the router's choice
        t2 = clock()
        fetcher = self.routed.fetcher
        with fetcher.fetch(layer, chosen) as f:
            slots = fetcher.gpu_slots(f)
            if self.routed.sync_timing:
                fetcher.wait_copies()
            t3 = clock()
            x = back.replay(to_device_int32(slots, x.device))
        t4 = clock()
        timers["routing_ms"] += (t2 - t1) * 1e3
        times.io_wait_ms += (t3 - t2) * 1e3  # reads, copies and the host's bookkeeping for them
        times.compute_ms += (t4 - t3) * 1e3
        return x
