"""Data shipped in the package: the small MoE trained for flashmoe (issue 13), a 4-bit store that `flashmoe demo`
runs with no download. small-moe/MODEL_CARD.md says what it is and how it was made."""

from pathlib import Path

SMALL_MOE = Path(__file__).resolve().parent / "small-moe"
