"""Short chats for the small model to learn its chat template and to answer in JSON when asked (issue 13's JSON
reliability benchmark needs a model that tries): questions about the manual pages (`apropos`'s one-line summaries)
and the standard library's modules (their docstrings' first lines), answered in a sentence or as a JSON object.

    python benchmarks/train/chats.py --out /data/corpus      # beside corpus.py's train.txt and heldout.txt

Writes chats-train.jsonl and chats-heldout.jsonl ({"kind", "messages"} a line; held out by the same hash of the
page or module name as corpus.py's documents, so a held-out name's answer is never trained on). train.py renders
them with the tokenizer's chat template (thinking off: the empty think block the Qwen3.5 template writes) and adds
them to the token stream. benchmarks/json_reliability.py asks the held-out ones.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sysconfig
from pathlib import Path

from corpus import SKIP_MAN, SKIP_MODULES, held_out

APROPOS = re.compile(r"^(\S+) \((\w+)\)\s+- (.+)$")
ASKS = {  # kind -> the phrasings of its question (one picked by a hash of the name)
    "page_json": ['Describe the manual page of `{name}` as JSON with the keys "name", "section" and "summary".',
                  'Give `{name}` as a JSON object with "name", "section" and "summary".',
                  "Answer in JSON (name, section, summary): what is `{name}`?"],
    "page_text": ["What is `{name}`?", "What does `{name}` do?", "Explain `{name}` in one sentence."],
    "module_json": ['Describe the Python module `{name}` as JSON with the keys "module" and "summary".',
                    'Give the Python module `{name}` as a JSON object with "module" and "summary".'],
    "module_text": ["What is the Python module `{name}` for?", "What does the Python module `{name}` do?"],
}


def pick(name: str, options: list[str]) -> str:
    return options[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(options)]


def sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text[:1].upper() + text[1:] + "."


def manual_pages() -> list[tuple[str, str, str]]:
    """(name, section, summary) of every manual page `apropos` knows (English; not gcloud's)."""
    out = subprocess.run(["apropos", "-l", "."], capture_output=True, text=True).stdout
    pages = {}
    for line in out.splitlines():
        m = APROPOS.match(line.strip())
        if m and not m[1].startswith(SKIP_MAN) and len(m[3].split()) >= 2:
            pages.setdefault(m[1], (m[1], m[2], m[3].strip()))
    return sorted(pages.values())


def modules() -> list[tuple[str, str]]:
    """(module, its docstring's first line) of the standard library's modules."""
    root, found = Path(sysconfig.get_paths()["stdlib"]), []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in SKIP_MODULES or p.startswith(("test", "_")) for p in parts) or "site-packages" in parts:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_bytes()))
        except (SyntaxError, ValueError, OSError):
            continue
        first = (doc or "").strip().split("\n\n")[0]
        if len(first.split()) >= 3 and not first.startswith(("#", "-", "=")):
            found.append((".".join(p for p in parts if p != "__init__"), " ".join(first.split())))
    return found


def chats() -> list[tuple[str, str, list[dict]]]:
    """(name, kind, messages) for every page and module: each name once as JSON and once in a sentence."""
    made = []
    for name, section, summary in manual_pages():
        answers = {"page_json": json.dumps({"name": name, "section": section, "summary": summary}),
                   "page_text": f"`{name}` (section {section} of the manual): {sentence(summary)}"}
        made += [(name, kind, [{"role": "user", "content": pick(name, ASKS[kind]).format(name=name)},
                               {"role": "assistant", "content": answer}]) for kind, answer in answers.items()]
    for name, summary in modules():
        answers = {"module_json": json.dumps({"module": name, "summary": summary}),
                   "module_text": f"`{name}`: {sentence(summary)}"}
        made += [(name, kind, [{"role": "user", "content": pick(name, ASKS[kind]).format(name=name)},
                               {"role": "assistant", "content": answer}]) for kind, answer in answers.items()]
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0}
    files = {split: open(args.out / f"chats-{split}.jsonl", "w", encoding="utf-8") for split in counts}
    for name, kind, messages in chats():
        split = "heldout" if held_out(name) else "train"
        files[split].write(json.dumps({"kind": kind, "name": name, "messages": messages}) + "\n")
        counts[split] += 1
    for f in files.values():
        f.close()
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
