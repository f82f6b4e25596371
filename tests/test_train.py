"""The training script of the shipped model (benchmarks/train/train.py, issue 13), at a toy size on the CPU: a run
cut in two trains exactly what an uncut one does, and what it exports is a checkpoint flashmoe converts and runs as
transformers does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

import flashmoe
from conftest import rel_error
from flashmoe.convert import convert
from flashmoe.tiny import CORPUS

TRAIN = Path(__file__).resolve().parents[1] / "benchmarks" / "train" / "train.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = CORPUS.strip().splitlines()
    (corpus / "train.txt").write_text("\n\n".join(" ".join(lines[i:] + lines[:i]) for i in range(len(lines))) * 20)
    (corpus / "heldout.txt").write_text(" ".join(reversed(lines)) + "\n\n" + " ".join(lines))
    chat = {"kind": "page_json", "name": "ls", "messages": [
        {"role": "user", "content": "Describe `ls` as JSON."},
        {"role": "assistant", "content": '{"name": "ls", "section": "1", "summary": "list directory contents"}'}]}
    (corpus / "chats-train.jsonl").write_text(json.dumps(chat) + "\n")
    return corpus


def test_a_run_cut_in_two_trains_what_an_uncut_one_does_and_exports_a_checkpoint_flashmoe_runs(tmp_path):
    script, corpus = _script(), _corpus(tmp_path)
    common = ["--corpus", str(corpus), "--preset", "test", "--steps", "6", "--batch", "2", "--seq", "24",
              "--log-every", "1", "--eval-every", "3", "--eval-windows", "2", "--device", "cpu"]
    script.main(common + ["--out", str(tmp_path / "whole")])
    script.main(common + ["--out", str(tmp_path / "cut"), "--run-steps", "4"])
    script.main(common + ["--out", str(tmp_path / "cut"), "--export", str(tmp_path / "hf")])
    whole, cut = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("whole", "cut"))
    assert whole["step"] == cut["step"] == 6
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["heldout_loss"] > 0 for r in log if "heldout_loss" in r)
    # the chats follow the documents, rendered by the chat template as generation will see them (thinking off)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "cut" / "tokenizer")
    text = tok.decode(np.load(tmp_path / "cut" / "tokens-train.npy").tolist())
    assert text.endswith('<|im_start|>user\nDescribe `ls` as JSON.<|im_end|>\n<|im_start|>assistant\n<think>\n\n'
                         '</think>\n\n{"name": "ls", "section": "1", "summary": "list directory contents"}<|im_end|>\n'
                         "<|endoftext|>")
    # the export is a Qwen3.5-MoE checkpoint with the Qwen3.5 chat template: flashmoe converts and runs it
    from transformers import AutoModelForCausalLM

    convert(tmp_path / "hf", tmp_path / "store", bits=None)
    model = flashmoe.load(tmp_path / "store")
    ids = model.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert rel_error(model.logits(ids), expected) < 1e-3


def test_a_folder_packed_in_parts_over_two_calls_unpacks_whole(tmp_path):
    """pack.py: the device returns a trained model as parts of at most 16 MiB; unpack joins them or says what is
    missing."""
    import pytest

    spec = importlib.util.spec_from_file_location("pack", TRAIN.parent / "pack.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    first = pack.pack(folder, tmp_path / "call1", part_mib=2000 / 2**20, first=0, count=3)
    second = pack.pack(folder, tmp_path / "call2", part_mib=2000 / 2**20, first=3)
    assert len(first) == 3 and len(second) >= 2
    with pytest.raises(SystemExit, match="fetch the rest first"):
        pack.unpack([tmp_path / "call1"], tmp_path / "back")
    pack.main(["unpack", str(tmp_path / "call1"), str(tmp_path / "call2"), str(tmp_path / "back")])
    assert (tmp_path / "back" / "hf" / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()
    assert (tmp_path / "back" / "hf" / "sub" / "config.json").read_text() == '{"a": 1}'


def test_the_corpus_keeps_prose_and_splits_by_name(tmp_path):
    """corpus.py: paragraphs of sentences stay, synopses and option lists go; docstrings are read without importing;
    the held-out split depends on a document's name alone."""
    spec = importlib.util.spec_from_file_location("corpus", TRAIN.parent / "corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    assert corpus.prose("The cache keeps the experts a model used last,\n  so the next token reads fewer of them.") == (
        "The cache keeps the experts a model used last, so the next token reads fewer of them.")
    assert corpus.prose("ls [-a] [-l] [--color=WHEN] [FILE...]") is None  # a synopsis
    assert corpus.prose("-v, --verbose  print more") is None  # too short, no sentence
    assert corpus.prose("0x1f 0x2e 0x3d 0x4c 0x5b 0x6a 0x79 0x88 0x97 end.") is None  # not words
    package = tmp_path / "pkg"
    (package / "tests").mkdir(parents=True)
    (package / "mod.py").write_text('"""A module whose docstring explains what it does in a full sentence."""\n'
                                    'raise SystemExit("importing this would stop the build")\n'
                                    'def f():\n    """Return the answer, which the caller then prints for the user."""\n')
    (package / "tests" / "test_mod.py").write_text('"""A test module, which the corpus leaves out of its text."""\n')
    docs = corpus.docstrings([tmp_path])
    assert list(docs) == ["py:pkg/mod.py"] and len(docs["py:pkg/mod.py"]) == 2
    names = [f"man:page{i}.1.gz" for i in range(500)]
    held = [n for n in names if corpus.held_out(n)]
    assert 0 < len(held) < 30 and held == [n for n in names if corpus.held_out(n)]


def test_steps_auto_fits_the_schedule_to_the_first_runs_minutes_and_keeps_it(tmp_path):
    script, corpus = _script(), _corpus(tmp_path)
    common = ["--corpus", str(corpus), "--out", str(tmp_path / "run"), "--preset", "test", "--batch", "2",
              "--seq", "16", "--log-every", "5", "--eval-every", "1000", "--eval-windows", "1", "--device", "cpu"]
    script.CALIBRATE = 5  # a few steps are enough to time at this size (and keep a loaded machine inside 6 s)
    script.main(common + ["--steps", "auto", "--minutes", "0.1"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    fitted = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert isinstance(state["steps"], int) and state["steps"] > 10 + script.CALIBRATE
    assert [r["steps"] for r in fitted if "steps_per_s" in r] == [state["steps"]]
    script.main(common + ["--steps", "auto", "--run-steps", "2"])  # a later run follows the fitted schedule
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["steps"] == state["steps"]
    try:
        script.main(common + ["--steps", "3000"])
        raise AssertionError("a run went on with a schedule other than its checkpoint's")
    except SystemExit as e:
        assert f"schedule has {state['steps']} steps" in str(e)


def test_the_corpus_reads_the_prose_of_html_pod_and_info_manuals():
    """corpus.py --debs: a manual's paragraphs stay; code, scripts, navigation and POD's verbatim paragraphs go."""
    spec = importlib.util.spec_from_file_location("corpus", TRAIN.parent / "corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    sentence = "The cache keeps the experts a model used last, so the next token reads fewer of them."
    html = ("<html><head><title>Experts</title><script>var a = 'Some script text that reads like a sentence.';"
            "</script></head><body><div class='related'><a>Next</a> <a>Previous</a> <a>Up</a> is the navigation "
            "bar of this page, which is no prose.</div>"
            f"<p>{sentence.replace('experts', '<em>experts</em>')}</p><p>Run it as follows in the shell:<pre>"
            "for x in the list of experts we read; do echo the expert that a model used last; done.</pre>"
            "then the rest of this sentence is cut by the code block above.</p></body></html>")
    assert corpus.html_prose(html) == [sentence]
    pod = (f"=head1 DESCRIPTION\n\n{sentence.replace('cache', 'B<cache>').replace('model', 'L<model|perlmod>')}\n\n"
           "    my $cache = Cache->new(experts => 8);  # a verbatim paragraph: code, says it in a sentence.\n\n"
           "=begin html\n\n<p>An HTML block that POD readers other than HTML leave out of the text.</p>\n\n=end html\n")
    assert corpus.pod_prose(pod) == [sentence]
    info = (f"\x1f\nFile: x.info,  Node: Top,  Up: (dir)\n\n{sentence}\n\n"
            "* Menu:\n\n* Cache:: Where the experts that a model used last are kept.\n")
    assert corpus.info_prose(info) == [sentence]
    assert corpus.NOT_ENGLISH.search("usr/share/doc/debian-handbook/html/fr-FR/a.html")
    assert corpus.NOT_ENGLISH.search("usr/share/doc/gnucash-docs/gnucash-guide-de/a.html")
    assert not corpus.NOT_ENGLISH.search("usr/share/doc/rust-doc/html/std/io/index.html")
