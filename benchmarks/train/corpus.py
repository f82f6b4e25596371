"""The English corpus the small model trains on (issue 13), from text a Debian-like machine carries offline: the
manual pages (sections 1-8, English only, rendered by groff) and the docstrings of the Python files installed (the
standard library and site-packages: torch's, transformers', numpy's... documentation).

    python benchmarks/train/corpus.py --out /data/corpus [--workers 16]

Keeps prose only: paragraphs of at least MIN_WORDS words, most of them made of letters, ending like a sentence
(synopses, option tables and code stay out). A document is a manual page or a module; one in HOLD_OUT of them (by
a hash of its name, so the split is the same wherever it is rebuilt) is held out for evaluation. Writes train.txt
and heldout.txt (documents separated by a blank line, paragraphs by newlines) and corpus.json (sizes, sources,
sha256 of each file: the provenance the model card quotes). The text depends on what the machine has installed:
carry the files, not the recipe, to the machine that trains.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MIN_WORDS = 8
HOLD_OUT = 50  # one document in this many
MAN_ROOT = Path("/usr/share/man")
WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")
# folders whose files are tests, vendored copies or not prose
SKIP_MODULES = {"test", "tests", "testing", "idlelib", "turtledemo", "lib2to3", "ensurepip", "_vendor", "vendored",
                "site-packages"}
# manual pages left out: the Google Cloud SDK's 16,000 generated pages would be most of the text, each much alike
SKIP_MAN = ("gcloud",)
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&()-]*$", re.MULTILINE)  # a manual page's section heading, alone on its line


def prose(paragraph: str) -> str | None:
    """The paragraph as one line if it reads as English prose, else None."""
    text = " ".join(paragraph.split())
    words = text.split()
    if len(words) < MIN_WORDS or not text.endswith((".", "?", "!", ".)", '."')):
        return None
    if sum(bool(WORD.fullmatch(w.strip(".,;:()\"'`"))) for w in words) < 0.7 * len(words):
        return None
    return text


def man_page(path: str) -> tuple[str, list[str]]:
    """One manual page rendered (no hyphenation, lines as long as paragraphs) -> its prose paragraphs."""
    try:
        source = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
        text = subprocess.run(["groff", "-Tutf8", "-man", "-rLL=4000n", "-rHY=0", "-P-cbou"], input=source,
                              capture_output=True, timeout=30).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired, EOFError):
        return path, []
    paragraphs = re.split(r"\n\s*\n", HEADING.sub("", text))
    return path, [p for p in map(prose, paragraphs) if p]


def man_pages(workers: int) -> dict[str, list[str]]:
    paths = sorted(str(p) for s in range(1, 9) for p in (MAN_ROOT / f"man{s}").glob("*")
                   if p.is_file() and not p.name.startswith(SKIP_MAN))
    with ProcessPoolExecutor(workers) as pool:
        return {f"man:{Path(p).name}": paras for p, paras in pool.map(man_page, paths, chunksize=32) if paras}


def docstrings(roots: list[Path]) -> dict[str, list[str]]:
    """The docstrings of the Python files under `roots` (the standard library and the installed packages), a
    document per file, read with ast: nothing is imported (importing runs code; some modules print or open windows)."""
    docs = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if any(part in SKIP_MODULES or part.startswith("test") for part in path.relative_to(root).parts[:-1]):
                continue
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            texts = [ast.get_docstring(node) or "" for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            paragraphs = [p for t in texts for p in map(prose, re.split(r"\n\s*\n", t)) if p]
            if paragraphs:
                docs[f"py:{path.relative_to(root)}"] = paragraphs
    return docs


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HOLD_OUT == 0


def write(out: Path, documents: dict[str, list[str]]) -> dict:
    """train.txt and heldout.txt; repeated paragraphs (licence blurbs, "See also" lines) kept once."""
    out.mkdir(parents=True, exist_ok=True)
    seen, counts = set(), {"train": [0, 0], "heldout": [0, 0]}
    files = {split: open(out / f"{split}.txt", "w", encoding="utf-8") for split in counts}
    try:
        for name in sorted(documents):
            kept = []
            for p in documents[name]:
                if p not in seen:
                    seen.add(p)
                    kept.append(p)
            if kept:
                split = "heldout" if held_out(name) else "train"
                files[split].write("\n".join(kept) + "\n\n")
                counts[split][0] += 1
                counts[split][1] += len(kept)
    finally:
        for f in files.values():
            f.close()
    return {split: {"documents": d, "paragraphs": p, "bytes": (out / f"{split}.txt").stat().st_size,
                    "sha256": hashlib.sha256((out / f"{split}.txt").read_bytes()).hexdigest()}
            for split, (d, p) in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--no-man", action="store_true", help="leave the manual pages out (no groff here)")
    args = ap.parse_args()
    documents = {} if args.no_man else man_pages(args.workers)
    man_count = len(documents)
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")})
    documents.update(docstrings(roots))
    info = {"sources": {"man pages (sections 1-8, English; not gcloud's)": man_count,
                        f"docstrings of Python {sys.version.split()[0]}'s files under {', '.join(map(str, roots))}":
                        len(documents) - man_count},
            "min_words": MIN_WORDS, "hold_out": f"1 in {HOLD_OUT} documents, by sha256 of the name",
            **write(args.out, documents)}
    (args.out / "corpus.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
