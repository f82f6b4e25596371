"""What quantizing the resident matrices costs in quality: perplexity and next-token agreement with float residents,
by resident format, for a store (the shipped small model by default) over windows of a text.

    python benchmarks/resident_quality.py [--store flashmoe/data/small-moe] [--text FILE ...] [--formats float,int8,int4]
    python benchmarks/resident_quality.py --device cuda --one-token --dot4 off,on

The text is tokenized with the store's tokenizer and cut into --windows evenly spaced windows of --window tokens
(teacher-forced); the experts are the store's own in every row, so rows differ by their residents alone.
--one-token reads each window a token a step (the decode kernels and graphs); on a GPU --dot4 off,on measures each
format with the float decode kernels (FLASHMOE_GPU_DOT4=0) and with the integer dot products (the default).
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
                    help="files to read (default: the source of Python's own json, argparse and pathlib modules)")
    ap.add_argument("--formats", default="float,int8,int4")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one-token", action="store_true", help="a token a step (decode) instead of a prompt a window")
    ap.add_argument("--dot4", default=None, help="off,on: each format with FLASHMOE_GPU_DOT4=0 and with its default")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import json
    import os
    import pathlib

    from tokenizers import Tokenizer

    files = args.text or [Path(m.__file__) for m in (json, argparse, pathlib)]
    text = "\n".join(f.read_text() for f in files)
    ids = np.array(Tokenizer.from_file(str(args.store / "tokenizer.json")).encode(text).ids)
    windows = windows_of(ids, args.windows, args.window)
    runs = [(fmt, dot4) for fmt in args.formats.split(",") for dot4 in (args.dot4 or "").split(",")]
    name = {"": "{}", "off": "{}, float kernels", "on": "{}, dot4"}
    rows, reference = [], None
    for fmt, dot4 in runs:
        if dot4 == "off":
            os.environ["FLASHMOE_GPU_DOT4"] = "0"
        else:
            os.environ.pop("FLASHMOE_GPU_DOT4", None)
        ppl, agree, argmax, _ = measure(args.store, None, windows, reference, resident_format=fmt,
                                        device=args.device, one_token=args.one_token)
        reference = reference if reference is not None else argmax
        rows.append(f"| {name[dot4].format(fmt)} | {ppl:.3f} | {'100.0%' if agree is None else f'{agree:.1%}'} |")
        print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if args.device != "cpu" else f"the CPU, {torch.get_num_threads()} threads"
    publish(f"\n### Resident formats (`benchmarks/resident_quality.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: {args.windows} windows of {args.window} tokens of "
            f"{', '.join(f.name for f in files)} ({len(ids)} tokens), store {args.store.name}, {where}, "
            f"{'a token a step' if args.one_token else 'a window a prompt'}; agreement: next-token argmax equal to "
            f"the first row's.\n\n"
            f"| residents | perplexity | agreement with the first |\n|---|---|---|\n" + "\n".join(rows) + "\n",
            args.out)


if __name__ == "__main__":
    main()
