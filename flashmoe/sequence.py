"""One request's generation as steps (nano-vllm's Sequence): what the next forward takes, and what to do with the
logits it gives back. `Model.generate` runs one sequence a forward at a time; the server's scheduler runs all of
its running sequences through one `Model.forward_batch` a step.

A sequence goes through its prompt in chunks (the whole prompt in one unless `prefill_chunk`), then one token a
step until a stop token, its budget or its constraint ends it. With a prefix cache it keeps its state at the end
of the prompt, at each position in `keep_at`, and at the end of the reply.
"""

from __future__ import annotations

import torch

from .errors import FlashMoeError
from .sampling import TokenConstraint, sample

SEED_RANGE = (-(2 ** 63), 2 ** 64)  # what torch.Generator.manual_seed takes


class Sequence:
    def __init__(self, model, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 constraint: TokenConstraint | None = None, prefill_chunk: int | None = None,
                 keep_at: tuple[int, ...] = ()):
        if max_new_tokens < 0:
            raise FlashMoeError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise FlashMoeError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise FlashMoeError(f"seed must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1] - 1}), not {seed}")
        chunk = prefill_chunk or max(len(token_ids), 1)
        if chunk < 1:
            raise FlashMoeError(f"prefill_chunk must be >= 1, not {prefill_chunk}")
        self.model = model
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.stops = set(model.eos_token_ids if stop_token_ids is None else stop_token_ids)
        if model.pipeline is not None and not model.pipeline.led and seed is None and temperature > 0:
            seed = model.pipeline.shared_seed()  # every rank must draw the same token
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # with a seed: one per device sampled on
        self.constraint = constraint
        self.ids = list(token_ids)
        self.state, done = model._resume(self.ids)
        self.keep = (sorted(p for p in set(keep_at) if done < p < len(self.ids))
                     if model.prefix_cache is not None else [])
        # the prompt's chunks, cut at the positions to keep as well
        self._ends = sorted(set(range(done + chunk, len(self.ids), chunk)) | set(self.keep) | {max(len(self.ids), 1)})
        self._start = done
        self.prompt_done = False
        self.seen: list[int] = []  # the tokens the state holds, once the prompt is in
        self.generated = 0
        self.last: int | None = None  # the last token made, which the next step feeds
        self.done = False
        self.consistent = True  # False while a forward is under way: a state cut short must not be kept
        self.picked: int | None = None  # the argmax of the next logits, when Model.step took a batch's at once

    def begin(self) -> list[int]:
        """The tokens the next forward takes: the prompt's next chunk, or the last token made."""
        if self.done:
            raise FlashMoeError("this sequence is finished")
        self.consistent = False
        return self.ids[self._start : self._ends[0]] if not self.prompt_done else [self.last]

    def advance(self, logits: torch.Tensor) -> int | None:
        """Take the logits of begin()'s last token: the next token, or None after a prompt chunk that is not the
        last (or after the whole prompt when no token is asked for)."""
        model = self.model
        self.consistent = True
        if self.prompt_done:
            self.seen.append(self.last)
        else:
            end = self._ends.pop(0)
            if end in self.keep:
                model._keep(self.ids[:end], self.state)
            self._start = end
            if self._ends:
                return None
            self.prompt_done = True
            model._tokens["prompt_tokens"] += len(self.ids)
            self.seen = list(self.ids)
            model._keep(self.seen, self.state)  # the end of the prompt: where a retry or an edited reply branches
            if self.max_new_tokens == 0:
                self.done = True
                return None
        row = logits[-1]
        if self.constraint is not None:  # grammars mask a row in host memory
            row = row.float().cpu().clone()  # a normal tensor: the forward's output is an inference tensor, read-only
            self.constraint.mask(row)
        # otherwise sampled where the logits are: one int crosses from a GPU, not a row of the vocabulary
        token = self.picked if self.picked is not None else sample(row, self.temperature, self.top_p, self.top_k,
                                                                   self._generator(row.device))
        self.picked = None
        if self.constraint is not None:
            self.constraint.accept(token)
        model._tokens["generated_tokens"] += 1
        self.generated += 1
        self.last = token
        self.done = (token in self.stops or self.generated == self.max_new_tokens
                     or (self.constraint is not None and self.constraint.finished))
        return token

    @property
    def greedy(self) -> bool:
        """Its next token is the logits' argmax (Model.step may find a batch's in one pass)."""
        return self.temperature <= 0 and self.constraint is None

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None or self.temperature <= 0:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def close(self) -> None:
        """The end of the reply (or of what was made of it): where the next turn of a chat starts."""
        if self.prompt_done and self.consistent:
            self.model._keep(self.seen, self.state)
        self.model.forget(self.state)
