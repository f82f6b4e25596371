"""One model over several processes (torch.distributed): one per GPU, or per host, for a model larger than one host.

Rank r holds block r of the layers (placement.py: contiguous blocks sized by each rank's free memory), their resident
weights and their experts. A forward pass starts on rank 0 (the embedding), the hidden state goes from rank to rank
once (a few KB a token), and the last rank's logits are broadcast, so every rank holds the same logits, samples the
same token and runs the same loop: every rank runs the same program (launch it with torchrun). NCCL carries the
hidden state between GPUs, gloo between CPUs.

Serving is led by rank 0 instead (`led`): it alone takes requests, and announces each forward (which sequence, which
tokens) to the others, which follow; each sequence's caches live on every rank under one id, dropped when rank 0's
state is freed; the logits go from the last rank to rank 0 alone.

    torchrun --nproc-per-node 2 -m flashmoe generate STORE --prompt "..." --device cuda --distributed
    torchrun --nproc-per-node 2 -m flashmoe serve STORE --device cuda --distributed
"""

from __future__ import annotations

import itertools
import os
import random
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import FlashMoeError


@dataclass
class Pipeline:
    rank: int
    world: int
    led: bool = False  # rank 0 drives (serving) and the others follow; else every rank makes the same calls
    _ids: itertools.count = field(default_factory=itertools.count)
    _freed: list = field(default_factory=list)  # ids of sequences rank 0 dropped, told with the next announcement
    owns_group: bool = False  # joined here from torchrun's environment: left again at close()

    @classmethod
    def join(cls, device_type: str) -> "Pipeline":
        """The default process group, joined from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
        unless the program joined one itself: NCCL for GPUs, gloo for CPUs."""
        owns = not dist.is_initialized()
        if owns:
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise FlashMoeError(f"distributed needs torchrun's environment ({', '.join(missing)} not set); launch "
                                    "with: torchrun --nproc-per-node N -m flashmoe ...")
            if device_type == "cuda":
                torch.cuda.set_device(local_device_index())
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=owns)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def gather(self, value) -> list:
        """Every rank's `value` (a small picklable), in rank order."""
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def send_on(self, x: torch.Tensor) -> None:
        dist.send(x.contiguous(), self.rank + 1)

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, self.rank - 1)
        return x

    def share_logits(self, logits: torch.Tensor | None, shape: tuple[int, ...], device: torch.device
                     ) -> torch.Tensor | None:
        """The last rank's logits on every rank (led: on rank 0 alone; the others get None)."""
        if self.led:
            if self.last and not self.first:
                dist.send(logits.contiguous(), 0)
            elif self.first and not self.last:
                logits = torch.empty(shape, dtype=torch.float32, device=device)
                dist.recv(logits, self.world - 1)
            return logits if self.first else None
        if logits is None:
            logits = torch.empty(shape, dtype=torch.float32, device=device)
        dist.broadcast(logits, self.world - 1)
        return logits

    # ---- led by rank 0 ----------------------------------------------------------------------
    def register(self, state) -> None:
        """Rank 0's new sequence: an id the others know it by, told to drop when rank 0 frees it."""
        state.pipeline_id = next(self._ids)
        weakref.finalize(state, self._drop, state.pipeline_id)

    def _drop(self, state_id: int) -> None:
        self._freed.append(state_id)

    def announce(self, op: str, state_id: int | None = None, tokens: list[int] = (), all_logits: bool = True) -> None:
        """Rank 0 tells the others what comes next: "forward" (of tokens, for a sequence) or "stop"."""
        freed, self._freed = self._freed, []
        dist.broadcast_object_list([(op, state_id, list(tokens), all_logits, freed)], src=0)

    def listen(self) -> tuple[str, int | None, list[int], bool, list[int]]:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        return message[0]

    def shared_seed(self) -> int:
        """A seed drawn on rank 0 and used by all: sampling must pick the same token on every rank."""
        seed = [random.randrange(2**63) if self.first else None]
        dist.broadcast_object_list(seed, src=0)  # rank 0's alone travels (a gather would send every rank's)
        return seed[0]


def local_device_index() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))
