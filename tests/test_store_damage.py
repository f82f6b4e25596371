"""A damaged store never gives a traceback or a silent wrong answer: every manifest field is checked at load, resident
files carry checksums that `info --verify` compares, and a resumed conversion re-checks what it had finished."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import flashmoe
from flashmoe import convert as convert_module
from flashmoe.convert import convert
from flashmoe.errors import FlashMoeError
from flashmoe.manifest import manifest_crc32
from flashmoe.store import MANIFEST, Store

DELETE = object()
RESIDENT = "resident-00001-of-00001.safetensors"


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the tiny 4-bit Qwen3.5 store that a test may damage."""
    return shutil.copytree(built.store("qwen3_5_moe", 4), tmp_path / "store")


def read_manifest(store) -> dict:
    return json.loads((store / MANIFEST).read_text())


def write_manifest(store, manifest, checksum: bool = True) -> None:
    """As a buggy writer would: the damage under a checksum that matches it (checksum=False: a hand edit)."""
    if checksum and isinstance(manifest, dict) and "manifest_crc32" in manifest:
        manifest["manifest_crc32"] = manifest_crc32(manifest)
    (store / MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(store, edit, checksum: bool = True) -> None:
    manifest = read_manifest(store)
    edit(manifest)
    write_manifest(store, manifest, checksum)


def assert_one_line_error(code: int, out: str, err: str, message: str) -> None:
    assert code == 1 and "Traceback" not in out + err
    last = err.splitlines()[-1]  # after a progress bar, if any
    assert last.startswith("error: ") and message in last and err.endswith(last + "\n"), err


# ---- the fuzz test: every field of a valid manifest, mutated one at a time -----------------------------------
def tree_paths(value, path=()):
    """Every node of a JSON tree, parents first; of a long list (offsets, checksums) its first and last entries."""
    yield path
    children = list(value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ())
    if isinstance(value, list) and len(children) > 8:
        children = [children[0], children[-1]]
    for key, child in children:
        yield from tree_paths(child, path + (key,))


def mutations(value):
    yield "delete", DELETE
    for other in (None, "x", -1, 0, 2**40, 0.5, True, []):
        if type(other) is not type(value) or other != value:
            yield repr(other), other
    if isinstance(value, list) and value:
        yield "drop last", value[:-1]
        yield "append", value + [copy.deepcopy(value[-1])]


def mutated(manifest, path, new):
    if not path:
        return new
    out = copy.deepcopy(manifest)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return out


def json_kind(value) -> str:
    return "number" if type(value) in (int, float) else type(value).__name__


def load_and_run(store) -> str | None:
    """None for a clean run, else the FlashMoeError's message; any other exception propagates."""
    try:
        model = flashmoe.load(store, cache_gb=0.001)
        try:
            model.logits([1, 2, 3])
        finally:
            model.close()
    except FlashMoeError as exc:
        return str(exc)
    return None


def test_every_manifest_field_mutated_gives_one_line_or_runs(store):
    """Each node of a valid manifest deleted or replaced (null, a string, -1, 0, 2**40, 0.5, true, [], one entry
    fewer or more) under a matching checksum, then loaded and run: one line, or a model that runs."""
    original = read_manifest(store)
    failures, retyped = [], []
    for path in tree_paths(original):
        value = original
        for key in path:
            value = value[key]
        for name, new in mutations(value):
            if not path and new is DELETE:
                continue
            # mutating the checksum itself, it stays as mutated; anywhere else it is recomputed over the damage
            write_manifest(store, mutated(original, path, new), checksum=path != ("manifest_crc32",))
            where = "/".join(map(str, path)) + f" <- {name}"
            try:
                message = load_and_run(store)
            except Exception as exc:  # noqa: BLE001 - the point: nothing but FlashMoeError may escape
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            if message is not None and ("\n" in message or not message.strip()):
                failures.append(f"{where}: not one line: {message!r}")
            if message is None and new is not DELETE and json_kind(new) != json_kind(value) and path[0] != "source":
                retyped.append(where)  # a field of another JSON type loaded: only `source` is a record nothing reads
    assert not failures, "\n".join(failures)
    assert not retyped, retyped


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["config"].update(num_experts_per_tok=0), "manifest field config.num_experts_per_tok: is 0, below 1"),
    (lambda m: m["experts"]["layers"]["1"]["offsets"].__setitem__(3, 5), "experts.layers.1.offsets[3]: is 5, not a multiple"),
    (lambda m: m["resident"]["files"].__setitem__(0, "../secret.safetensors"), "resident.files[0]"),
    (lambda m: m["quantization"].update(bits=3), "manifest field quantization.bits: is 3"),
])
def test_cli_names_the_damaged_field_in_one_line(run_cli, store, edit, message):
    edit_manifest(store, edit)
    assert_one_line_error(*run_cli("info", store), message)


@pytest.mark.parametrize("text,message", [('{"format": "flashmoe", "config": ', "is not valid JSON"),
                                          ('["flashmoe", 1]', "is not a flashmoe manifest")])
def test_cli_on_a_manifest_that_is_not_an_object(run_cli, store, text, message):
    (store / MANIFEST).write_text(text)
    assert_one_line_error(*run_cli("info", store), message)


# ---- the manifest's own checksum -----------------------------------------------------------------------------
def test_an_edited_float_fails_the_manifest_checksum(store):
    edit_manifest(store, lambda m: m["config"].update(rms_norm_eps=1e-5), checksum=False)  # valid, but not what was converted
    with pytest.raises(FlashMoeError, match=r"^corrupt store: manifest.json fails its checksum \(damaged or edited\)"):
        flashmoe.load(store)


# ---- resident files: tensors checked at load, checksums by verify ---------------------------------------------
def test_flipped_resident_byte_is_found_by_verify(run_cli, store):
    path = store / RESIDENT
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data: the file still opens, with one weight wrong
    path.write_bytes(data)
    flashmoe.load(store, cache_gb=0.001).close()  # loading reads no whole-file checksum; verify does
    [problem] = Store(store).verify()
    assert problem.startswith(f"resident file {RESIDENT}: checksum")
    assert_one_line_error(*run_cli("info", store, "--verify"), f"resident file {RESIDENT}: checksum")


def test_truncated_resident_file_fails_at_load(store):
    path = store / RESIDENT
    size = path.stat().st_size
    os.truncate(path, size - 100)
    with pytest.raises(FlashMoeError, match=f"^corrupt store: resident file {RESIDENT} is {size - 100} bytes, the manifest says {size}"):
        flashmoe.load(store)
    edit_manifest(store, lambda m: m["resident"].pop("file_bytes"))  # an older store: the header check still sees it
    with pytest.raises(FlashMoeError, match=f"^corrupt store: cannot read resident file {RESIDENT}") as caught:
        flashmoe.load(store)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("edit,message", [
    (lambda ts: ts.pop("model.layers.2.linear_attn.A_log"), "resident tensor model.layers.2.linear_attn.A_log is missing"),
    (lambda ts: ts.update({"model.norm.weight": ts["model.norm.weight"][:32].clone()}),
     r"resident tensor model.norm.weight is \[32\], but the config implies \[64\]"),
    (lambda ts: ts.update({"model.layers.9.mlp.gate.weight": ts["model.layers.1.mlp.gate.weight"].clone()}),
     "holds model.layers.9.mlp.gate.weight, which the config has no place for"),
    (lambda ts: ts.update({"model.norm.weight": ts["model.norm.weight"].to(torch.int32)}),
     "resident tensor model.norm.weight is I32"),
])
def test_resident_tensors_are_checked_against_the_config(store, edit, message):
    """A writer that saved the wrong tensors, with sizes and checksums that match them: the names, shapes and
    dtypes the model needs still fail at load, in one line."""
    path = store / RESIDENT
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})

    def record(m):
        m["resident"].update(file_bytes={RESIDENT: path.stat().st_size}, crc32={RESIDENT: zlib.crc32(path.read_bytes())},
                             bytes=sum(t.numel() * t.element_size() for t in tensors.values()))

    edit_manifest(store, record)
    with pytest.raises(FlashMoeError, match=f"^corrupt store: .*{message}") as caught:
        flashmoe.load(store)
    assert "\n" not in str(caught.value)


# ---- stores written before the checksums ---------------------------------------------------------------------
def test_a_store_without_the_new_keys_still_loads(run_cli, store):
    def strip(m):
        del m["manifest_crc32"], m["resident"]["crc32"], m["resident"]["file_bytes"]

    edit_manifest(store, strip)
    assert flashmoe.load(store, cache_gb=0.001).logits([1, 2, 3]).shape == (3, 512)
    code, out, err = run_cli("info", store, "--verify")
    assert code == 0, err
    assert "all 64 expert checksums match; the resident files have no checksums" in out


def test_verify_names_both_kinds_of_checksum(run_cli, store):
    code, out, err = run_cli("info", store, "--verify")
    assert code == 0, err
    assert "all 64 expert checksums match; 1 resident file checksum matches" in out


# ---- a resumed conversion re-checks what it had finished ------------------------------------------------------
@pytest.fixture
def ckpt(built, tmp_path):
    return shutil.copytree(built.checkpoint("qwen3_5_moe"), tmp_path / "ckpt")


def interrupted_conversion(ckpt, out, monkeypatch) -> None:
    """Layers 0 and 1 finished, then the disk fills up writing layer 2."""
    real_fsync, calls = os.fsync, []

    def disk_fills_up(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(convert_module.os, "fsync", disk_fills_up)
    with pytest.raises(FlashMoeError, match="no space left on device"):
        convert(ckpt, out, bits=4)
    monkeypatch.setattr(convert_module.os, "fsync", real_fsync)


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_resume_rewrites_damaged_finished_files(built, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_conversion(ckpt, out, monkeypatch)
    flip_byte(out / "experts" / "layer_001.bin", 3 * 8192 + 100)  # expert 3 of a finished layer
    flip_byte(out / RESIDENT, (out / RESIDENT).stat().st_size - 3)
    written, logs = [], []
    monkeypatch.setattr(convert_module, "expert_tensors",
                        lambda *a, _real=convert_module.expert_tensors: written.append(1) or _real(*a))
    convert(ckpt, out, bits=4, log=logs.append)
    assert f"{RESIDENT} is damaged; rewriting it" in logs and "layer 1's file is damaged; rewriting it" in logs
    assert len(written) == 3 * 16  # layer 1 again, and layers 2 and 3; layer 0 was sound
    clean = built.store("qwen3_5_moe", 4)
    for name in [RESIDENT] + [f"experts/layer_{i:03d}.bin" for i in range(4)]:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert Store(out).verify() == []


@pytest.mark.parametrize("state", ["{not json", "[]", '{"options": {}}'])
def test_damaged_convert_state_says_to_start_over(ckpt, tmp_path, monkeypatch, state):
    out = tmp_path / "out"
    interrupted_conversion(ckpt, out, monkeypatch)
    (out / "convert-state.json").write_text(state)
    with pytest.raises(FlashMoeError, match=f"convert-state.json is damaged; remove {out} and run flashmoe convert again"):
        convert(ckpt, out, bits=4)
