"""Building blocks more than one family uses (flashmoe.models composes them; a block never names a family)."""
