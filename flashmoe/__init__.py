"""flashmoe: run Mixture-of-Experts models larger than memory by streaming experts from SSD."""

__version__ = "0.1.0"

from .errors import FlashMoeError  # noqa: E402


def load(path, device: str = "cpu", experts_per_token: int | None = None, cache_gb: float | None = None, **kwargs):
    """Open a flashmoe store: resident weights load now, routed experts stream from disk as the router picks them."""
    from .engine import Model

    return Model.load(path, device=device, experts_per_token=experts_per_token, cache_gb=cache_gb, **kwargs)


__all__ = ["FlashMoeError", "load", "__version__"]
