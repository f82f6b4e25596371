"""Layer math, one file per architecture family; nothing here touches files."""
