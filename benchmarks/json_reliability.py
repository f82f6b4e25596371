"""Does the model still write JSON when its experts are quantized harder (issue 13; Flash-MoE saw 2-bit break JSON
and tool calls)? Held-out questions that ask for a JSON object, answered free-running and under the JSON grammar
(grammar.py, what the server's response_format uses), at each bit width.

    python benchmarks/json_reliability.py --checkpoint /data/run/hf --chats /data/corpus/chats-heldout.jsonl
        --work /data/q [--bits none,8,4,2] [--n 60] [--temperature 0.7] [--out RESULTS.md]

The questions are chats.py's held-out *_json chats (pages and modules whose answers were never trained on); each
is asked once per store with thinking off, sampled at --temperature with seed = its index (the same draws for every
store), up to --max-tokens. Counted: answers that parse as JSON, that are an object with exactly the keys asked
for, and whose name field (name or module) is the one asked about. Under the grammar the schema is those keys as
strings of at most 160 characters, all required, no others: every answer parses, whatever the bits. Without the
bound a weak model can loop inside a string until --max-tokens cuts it (the small model did in 2 of 60 answers,
at every width): such answers are counted apart, as cut.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from common import publish
from quality import store_for


def questions(chats: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in chats.read_text().splitlines()]
    asked = [r for r in rows if r["kind"].endswith("_json")][:n]
    for r in asked:
        r["expected"] = json.loads(r["messages"][1]["content"])
    return asked


MAX_LENGTH = 160  # characters a value may take under the grammar (the trained answers' 99th percentile is 105)


def schema_of(expected: dict) -> dict:
    """The keys asked for, as strings of at most MAX_LENGTH: a weak model can repeat itself inside a string for
    ever, and only a bound lets the grammar close it."""
    return {"type": "object", "properties": {k: {"type": "string", "maxLength": MAX_LENGTH} for k in expected},
            "required": list(expected), "additionalProperties": False}


def judge(text: str, expected: dict) -> tuple[bool, bool, bool]:
    """(parses, has exactly the expected keys, names the right thing)."""
    try:
        got = json.loads(text)
    except ValueError:
        return False, False, False
    keys = isinstance(got, dict) and set(got) == set(expected)
    name_key = "name" if "name" in expected else "module"
    return True, keys, keys and got.get(name_key) == expected[name_key]


def answer(model, ids: list[int], max_tokens: int, temperature: float, seed: int, constraint=None) -> tuple[str, bool]:
    """(the answer's text, whether it was cut at max_tokens rather than ended by the model or the grammar)."""
    eos = set(model.eos_token_ids)
    made = [t for t in model.generate(ids, max_tokens, temperature=temperature, top_p=0.95, seed=seed,
                                      constraint=constraint) if t is not None]
    cut = len(made) == max_tokens and made[-1] not in eos and not (constraint and constraint.finished)
    text = model.tokenizer.decode([t for t in made if t not in eos], skip_special_tokens=True).strip()
    return text, cut


def measure(store: Path, asked: list[dict], max_tokens: int, temperature: float) -> dict:
    import flashmoe
    from flashmoe.grammar import Grammars

    model = flashmoe.load(store, resident_format="float")
    grammars = Grammars(model.tokenizer, model.config.vocab_size, model.eos_token_ids)
    counts = {f"{mode}_{what}": 0 for mode in ("free", "grammar") for what in ("parses", "keys", "name", "cut")}
    sample = None
    for i, q in enumerate(asked):
        ids = model.encode_chat(q["messages"][:1], enable_thinking=False)
        for mode in ("free", "grammar"):
            constraint = grammars.json(schema_of(q["expected"]), "disabled") if mode == "grammar" else None
            text, cut = answer(model, ids, max_tokens, temperature, i, constraint)
            for what, ok in zip(("parses", "keys", "name", "cut"), (*judge(text, q["expected"]), cut)):
                counts[f"{mode}_{what}"] += ok
            if i == 0 and mode == "free":
                sample = text
    model.close()
    return {**{k: v / len(asked) for k, v in counts.items()}, "sample": sample}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face checkpoint (train.py --export)")
    ap.add_argument("--chats", type=Path, required=True, help="chats.py's chats-heldout.jsonl")
    ap.add_argument("--work", type=Path, required=True, help="stores are converted here (quality.py's too)")
    ap.add_argument("--bits", default="none,8,4,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=512, help="enough for every value at MAX_LENGTH, a character a token")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    asked = questions(args.chats, args.n)
    rows = []
    for b in args.bits.split(","):
        bits = None if b == "none" else int(b)
        store = store_for(args.checkpoint, args.work, bits, None if bits is None else args.group)
        rows.append({"bits": bits, **measure(store, asked, args.max_tokens, args.temperature)})
        print(json.dumps(rows[-1]), flush=True)
    text = (f"\n### JSON by bits (`benchmarks/json_reliability.py`, {datetime.date.today()})\n\n"
            f"`python {' '.join(sys.argv)}`: {len(asked)} held-out questions asking for a JSON object, thinking off, "
            f"temperature {args.temperature}, CPU.\n\n| experts stored | free: parses | free: right keys | "
            f"free: right name | grammar: parses | grammar: right name | grammar: cut at max tokens |\n"
            f"|---|---|---|---|---|---|---|\n")
    for r in rows:
        stored = "unquantized (bf16)" if r["bits"] is None else f"{r['bits']}-bit, group {args.group}"
        text += (f"| {stored} | {r['free_parses']:.0%} | {r['free_keys']:.0%} | {r['free_name']:.0%} | "
                 f"{r['grammar_parses']:.0%} | {r['grammar_name']:.0%} | {r['grammar_cut']:.0%} |\n")
    publish(text, args.out)
    return {"rows": rows}


if __name__ == "__main__":
    main()
