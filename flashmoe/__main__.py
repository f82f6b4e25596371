"""`python -m flashmoe ...` (what torchrun -m flashmoe runs on each rank): the command line."""

from .cli import main

main()
