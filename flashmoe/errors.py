"""The one exception type users see: every message names the problem and what to do about it."""

from __future__ import annotations

import sys


class FlashMoeError(Exception):
    """Bad input or a broken store: the message is meant for the user, not a traceback."""


def out_of_memory(exc: BaseException) -> FlashMoeError | None:
    """A GPU allocation that failed (a long prompt's KV cache and activations beside the expert cache, say) as one
    line saying what to do: torch's own message runs to a paragraph. None for any other exception."""
    torch = sys.modules.get("torch")  # not imported: not torch's error (the CLI starts without it)
    if torch is None or not isinstance(exc, torch.cuda.OutOfMemoryError):
        return None
    what = " ".join(str(exc).split()).split(" Including")[0].rstrip(". ")
    return FlashMoeError(f"the GPU ran out of memory ({what}); leave it more room: a smaller --vram-cache-gb "
                         "(vram_cache_gb=), --resident-format int8 or int4, or a shorter prompt or --max-tokens")
