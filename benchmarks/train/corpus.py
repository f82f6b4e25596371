"""The English corpus the small model trains on (issue 13), from text a Debian-like machine carries offline: the
manual pages (sections 1-8, English only, rendered by groff) and the docstrings of the Python files installed (the
standard library and site-packages: torch's, transformers', numpy's... documentation); with --debs, also the English
manuals of Debian documentation packages (HTML pages, Perl's POD, GNU info files):

    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    mkdir -p /tmp/amd64/partial && apt-get $o update
    mkdir -p /tmp/debs && cd /tmp/debs && apt-get $o download python3.11-doc perl-doc postgresql-doc-15 git-doc \
        debian-reference-en gnu-standards bash-doc debian-handbook linux-doc-6.1 python-django-doc rust-doc cmake-doc \
        nodejs-doc debian-policy developers-reference apache2-doc sphinx-doc python-setuptools-doc erlang-doc \
        debian-faq maint-guide octave-doc python-pandas-doc python-scipy-doc guile-3.0-doc binutils-doc gnuplot-doc \
        sqlite3-doc postfix-doc gnucash-docs r-doc-html debian-kernel-handbook   # Debian 12 (bookworm), main
    python benchmarks/train/corpus.py --out /data/corpus [--workers 16] [--debs /tmp/debs]

From a package: every HTML page under usr/share except translations (a path with a language folder such as fr/,
de-DE/, zh_CN/ or gnucash-guide-de/), its text outside <script>, <style>, <pre> and navigation (nav, header, footer,
sidebars); every .pod file, less its commands and verbatim (code) paragraphs; the info files under usr/share/info
when the package has no HTML (the same manual twice would not dedupe: the line breaks differ).

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
import tempfile
from concurrent.futures import ProcessPoolExecutor
from html.parser import HTMLParser
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


def proses(paragraphs) -> list[str]:
    """The paragraphs that read as prose, each as one line."""
    return [p for p in map(prose, paragraphs) if p]


def read_bytes(path: str) -> bytes:
    """A file's bytes, gunzipped when its name ends in .gz (manual pages and packages' docs often are)."""
    return gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()


def man_page(path: str) -> tuple[str, list[str]]:
    """One manual page rendered (no hyphenation, lines as long as paragraphs) -> its prose paragraphs."""
    try:
        source = read_bytes(path)
        text = subprocess.run(["groff", "-Tutf8", "-man", "-rLL=4000n", "-rHY=0", "-P-cbou"], input=source,
                              capture_output=True, timeout=30).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired, EOFError):
        return path, []
    paragraphs = re.split(r"\n\s*\n", HEADING.sub("", text))
    return path, proses(paragraphs)


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
            paragraphs = proses(p for t in texts for p in re.split(r"\n\s*\n", t))
            if paragraphs:
                docs[f"py:{path.relative_to(root)}"] = paragraphs
    return docs


# a translation's folder: fr/, pt-br/, de-DE/, zh_CN/ (apache2-doc, debian-handbook, linux-doc) or gnucash-guide-de/
NOT_ENGLISH = re.compile(r"(^|/|-)(ar|ca|cs|da|de|el|es|fa|fi|fr|hr|hu|id|it|ja|ko|nb|nl|pl|pt|ro|ru|sk|sv|tr|uk|vi|zh)"
                         r"([-_][A-Za-z]{2})?/")
SKIP_TAGS = {"script", "style", "pre", "textarea", "head", "nav", "header", "footer", "svg"}
# class or id of the navigation a generator adds (Sphinx, DocBook, Read the Docs, pydata, Erlang, Apache), whole
# names: "nav" inside one is no sign ("wy-nav-content" is the page), nor "sidebar" (DocBook's are boxes of prose)
NAVIGATION = {"related", "sphinxsidebar", "navheader", "navfooter", "navigation", "leftnav", "topbar", "footer",
              "header", "breadcrumbs", "headerlink", "rst-footer-buttons", "wy-nav-side", "bd-sidebar", "bd-toc",
              "bd-sidebar-primary", "bd-sidebar-secondary", "page-header", "toplang", "menu"}
# tags that end a paragraph; inline ones (a, em, code, span) stay inside it
BLOCK_TAGS = {"p", "li", "dd", "dt", "div", "blockquote", "ul", "ol", "dl", "table", "tr", "td", "th", "section",
              "article", "main", "body", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "caption", "figure", "figcaption"}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}


class _HTMLText(HTMLParser):
    """An HTML page's text blocks, less code, scripts and navigation."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks, self.text = [], []
        self.skip = None  # [tag, depth] of the element being skipped
        self.fragment = False  # the text since a <pre> inside a block: the rest of a sentence cut by code

    def handle_starttag(self, tag, attrs):
        if self.skip:
            self.skip[1] += tag == self.skip[0]
            return
        if tag in BLOCK_TAGS:
            self.flush()
        names = {n for k, v in attrs if k in ("class", "id") and v for n in v.split()}
        if tag not in VOID_TAGS and (tag in SKIP_TAGS or names & NAVIGATION):
            self.skip = [tag, 1]
            if tag == "pre":
                self.flush()
                self.fragment = True

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[0]:
                self.skip[1] -= 1
                if not self.skip[1]:
                    self.skip = None
        elif tag in BLOCK_TAGS:
            self.flush()

    def handle_data(self, data):
        if not self.skip:
            self.text.append(data)

    def flush(self):
        if self.text and not self.fragment:
            self.blocks.append("".join(self.text))
        self.text, self.fragment = [], False


def html_prose(html: str) -> list[str]:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    parser.flush()
    # texinfo writes a page per anchor that only points to its node (octave-doc: 2,000 of them)
    return [p for p in proses(parser.blocks) if not p.startswith("The node you are looking for is at")]


# B<x>, C<< $a->b >>, C<<< ... >>>, L<text|link>
POD_CODE = re.compile(r"[A-Z]<<<\s(.*?)\s>>>|[A-Z]<<\s(.*?)\s>>|[A-Z]<([^<>]*)>", re.DOTALL)


def _pod_code(m: re.Match) -> str:
    inner = next(g for g in m.groups() if g is not None)
    if m.group(0)[0] == "E":  # an escape: E<lt>, E<gt>, E<sol>
        return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(inner, "")
    if m.group(0)[0] in "XZ":  # index entries, nothing
        return ""
    return inner.split("|")[0] if m.group(0)[0] == "L" else inner


def pod_prose(pod: str) -> list[str]:
    """POD's ordinary paragraphs with their formatting codes resolved; commands (=head1, =item...), verbatim
    (indented: code) paragraphs and =begin/=for blocks left out. Not pod2text: its output indents list items as it
    does code, so the two could not be told apart."""
    paragraphs, block = [], False
    for para in re.split(r"\n[ \t]*\n", pod):
        if para.startswith("=begin"):
            block = True
        if block:
            block = not para.startswith("=end")
            continue
        if para.startswith(("=", " ", "\t")) or not para.strip():
            continue
        for _ in range(4):  # codes nest: B<L<...>>
            para = POD_CODE.sub(_pod_code, para)
        paragraphs.append(para)
    return proses(paragraphs)


def info_prose(info: str) -> list[str]:
    """A GNU info file's paragraphs, less each node's header line and menu."""
    paragraphs = []
    for node in info.split("\x1f")[1:]:
        node = node.split("* Menu:")[0]
        if node.lstrip().startswith(("Tag Table:", "End Tag Table")):
            continue
        paragraphs += re.split(r"\n\s*\n", node.lstrip().partition("\n")[2])
    # a definition's heading line (" -- Function: name args") would run into its description
    paragraphs = [re.sub(r"^ -- .*\n", "", p, flags=re.MULTILINE) for p in paragraphs]
    return proses(paragraphs)


def deb_file(path: str) -> tuple[str, list[str]]:
    """One file of an unpacked package -> its prose paragraphs, by its kind."""
    try:
        data = read_bytes(path)
    except (OSError, EOFError):
        return path, []
    text = data.decode("utf-8", "replace")
    name = path.removesuffix(".gz")
    if name.endswith(".pod"):
        return path, pod_prose(text)
    if re.search(r"\.info(-\d+)?$", name):
        return path, info_prose(text)
    return path, html_prose(text)


def deb_files(root: Path) -> list[Path]:
    """The files of an unpacked package that deb_file reads: English HTML, POD, and info when there is no HTML."""
    share = root / "usr" / "share"
    html = [p for p in share.rglob("*.htm*") if p.suffix in (".html", ".htm") and p.is_file()
            and not NOT_ENGLISH.search(str(p.relative_to(root)))]
    pod = [p for p in share.rglob("*.pod*") if p.name.endswith((".pod", ".pod.gz"))]
    info = [] if html else [p for p in (share / "info").rglob("*") if re.search(r"\.info(-\d+)?(\.gz)?$", p.name)]
    return sorted(html + pod + info)


def debs(folder: Path, workers: int) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The documents of every .deb in `folder` (one per page or file, named deb:package:path) and how many each
    package (named with its version) gave."""
    docs, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(workers) as pool:
        packages = {}
        for deb in sorted(folder.glob("*.deb")):
            fields = dict(line.split(": ", 1) for line in subprocess.run(
                ["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True,
                check=True).stdout.splitlines())
            root = Path(tmp) / fields["Package"]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            packages[fields["Package"]] = (fields["Version"], root)
        for package, (version, root) in packages.items():
            paths = [str(p) for p in deb_files(root)]
            before = len(docs)
            for path, paras in pool.map(deb_file, paths, chunksize=16):
                if paras:
                    docs[f"deb:{package}:{Path(path).relative_to(root)}"] = paras
            counts[f"{package} {version}"] = len(docs) - before
    return docs, counts


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
    ap.add_argument("--debs", type=Path, help="also read the English documentation of the .deb files in this folder")
    args = ap.parse_args()
    documents = {} if args.no_man else man_pages(args.workers)
    man_count = len(documents)
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")})
    documents.update(docstrings(roots))
    sources = {"man pages (sections 1-8, English; not gcloud's)": man_count,
               f"docstrings of Python {sys.version.split()[0]}'s files under {', '.join(map(str, roots))}":
               len(documents) - man_count}
    if args.debs:
        deb_docs, counts = debs(args.debs, args.workers)
        documents.update(deb_docs)
        sources["Debian packages' English documentation (package version: documents)"] = counts
    info = {"sources": sources,
            "min_words": MIN_WORDS, "hold_out": f"1 in {HOLD_OUT} documents, by sha256 of the name",
            **write(args.out, documents)}
    (args.out / "corpus.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
