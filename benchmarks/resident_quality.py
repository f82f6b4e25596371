"""What quantizing the resident matrices costs in quality on the CPU: perplexity and next-token agreement with float
residents, by resident format, for a store (the shipped small model by default) over windows of a text.

    python benchmarks/resident_quality.py [--store flashmoe/data/small-moe] [--text FILE ...] [--formats float,int8,int4]

The text is tokenized with the store's tokenizer and cut into --windows evenly spaced windows of --window tokens
(teacher-forced); the experts are the store's own in every row, so rows differ by their residents alone.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

from common import publish
from quality import measure, windows_of

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=ROOT / "flashmoe" / "data" / "small-moe")
    ap.add_argument("--text", type=Path, nargs="*", default=None,
                    help="files to read (default: the docstrings of Python's own json, argparse and pathlib modules)")
    ap.add_argument("--formats", default="float,int8,int4")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import argparse as a
    import json
    import pathlib

    from tokenizers import Tokenizer

    files = args.text or [Path(m.__file__) for m in (json, a, pathlib)]
    text = "\n".join(f.read_text() for f in files)
    ids = np.array(Tokenizer.from_file(str(args.store / "tokenizer.json")).encode(text).ids)
    windows = windows_of(ids, args.windows, args.window)
    formats = args.formats.split(",")
    rows, reference = [], None
    for fmt in formats:
        ppl, agree, argmax, _ = measure(args.store, None, windows, reference, resident_format=fmt)
        reference = reference if reference is not None else argmax
        rows.append(f"| {fmt} | {ppl:.3f} | {'100.0%' if agree is None else f'{agree:.1%}'} |")
        print(rows[-1], flush=True)
    publish(f"\n### Resident formats on the CPU (`benchmarks/resident_quality.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: {args.windows} windows of {args.window} tokens of "
            f"{', '.join(f.name for f in files)} ({len(ids)} tokens), store {args.store.name}, "
            f"{torch.get_num_threads()} threads; agreement: next-token argmax equal to the first format's.\n\n"
            f"| residents | perplexity | agreement with {formats[0]} |\n|---|---|---|\n" + "\n".join(rows) + "\n",
            args.out)


if __name__ == "__main__":
    main()
