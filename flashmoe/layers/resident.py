"""What every family's model holds: its resident weights by store name, the embedding and the head.

A model spread over several devices (placement.py) is one of these per device, each over its own layers' weights:
the first holds the embedding, the last the final norm and the head (and the embedding too, when tied to it)."""

from __future__ import annotations

import torch

from ..kernels.linear import embedding, is_matrix


class ResidentWeights:
    def __init__(self, weights: dict[str, torch.Tensor]):
        self.w = weights
        self.embed_weight = weights.get("model.embed_tokens.weight")
        self.lm_head = weights.get("lm_head.weight", self.embed_weight)  # tied embeddings have no lm_head
        # every layer has an input norm, in the weights' dtype on their device: a part without the embedding has one
        norm = next(t for name, t in weights.items() if name.endswith("input_layernorm.weight"))
        self.device, self.dtype = norm.device, norm.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return embedding(token_ids, self.embed_weight)

    def compress_matrices(self, compress) -> None:
        """Replace every projection weight (every matrix multiplied by `linear`: not the embedding table, norms,
        convs or vectors) by compress(weight); the head gets its own copy when tied to the embedding."""
        for name, t in self.w.items():
            if is_matrix(t) and name != "model.embed_tokens.weight":
                self.w[name] = compress(t)
        if self.lm_head is not None:
            self.lm_head = self.w["lm_head.weight"] if "lm_head.weight" in self.w else compress(self.lm_head)

    def settle(self) -> None:
        """Every tensor onto the model's device: after a load that kept the float matrices in RAM until
        compress_matrices quantized them onto it, those it left as they were (rows the group does not divide) and
        what the family derived from them while they were in RAM (DeepSeek-V3's absorbed kv_b_proj)."""
        for name, t in self.w.items():
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.w[name] = t.to(self.device)
