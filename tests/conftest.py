"""Fixtures: tiny random checkpoints built with transformers, converted once per session."""

from __future__ import annotations

import json
import os
import subprocess

import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter (must be set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CPU kernels keep float activations in the tests (and the processes they start), so comparisons with
# transformers and between paths measure the math, not the int8 rounding, which tests/test_cpu_native.py turns on
# and bounds on its own.
os.environ["FLASHMOE_CPU_ACTIVATIONS"] = "float"

import sys  # noqa: E402

import pytest  # noqa: E402


def _import_transformers_models_without_fla() -> None:
    """transformers is our float32 CPU reference; where fla-core is installed (the GPU machine) it binds fla's
    Triton kernels when its model modules are imported, and those refuse CPU tensors. Import them with fla
    hidden, so they bind their torch paths; flashmoe itself still finds fla."""
    import transformers.utils.import_utils as hf_imports

    saved = sys.modules.get("fla")
    sys.modules["fla"] = None  # import fla -> ImportError
    available = hf_imports.is_flash_linear_attention_available
    hf_imports.is_flash_linear_attention_available = lambda: False
    try:
        import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe  # noqa: F401
        import transformers.models.qwen3_next.modeling_qwen3_next  # noqa: F401
    finally:
        hf_imports.is_flash_linear_attention_available = available
        if saved is None:
            del sys.modules["fla"]
        else:
            sys.modules["fla"] = saved


_import_transformers_models_without_fla()

from flashmoe.convert import convert  # noqa: E402
from flashmoe.tiny import build_tiny_checkpoint, hf_as_mlx_lm_reads_it  # noqa: E402,F401

# one tiny checkpoint per layout a family module reads (LAYOUTS), and the multimodal Qwen3.5 wrapper too (ARCHS)
LAYOUTS = ["qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "minimax_m2", "gpt_oss"]
ARCHS = LAYOUTS + ["qwen3_5_moe_vl"]
# the layouts whose GGUF the generic import test reads back (GPT-OSS's file holds no clamp: its own test gives its
# checkpoint the released one)
GGUF_LAYOUTS = [a for a in LAYOUTS if a != "gpt_oss"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Built:
    """Checkpoints and stores made on first use and shared by every test of the session."""

    def __init__(self, root):
        self.root = root
        self._done = {}

    def checkpoint(self, arch: str, **overrides):
        key = ("ckpt", arch, tuple(sorted(overrides.items())))
        if key not in self._done:
            suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            self._done[key] = build_tiny_checkpoint(self.root / f"ckpt-{arch}{suffix}", arch, **overrides)
        return self._done[key]

    def store(self, arch: str, bits: int | None):
        key = ("store", arch, bits)
        if key not in self._done:
            self._done[key] = convert(self.checkpoint(arch), self.root / f"store-{arch}-{bits}", bits=bits)
        return self._done[key]


    def mlx_checkpoint(self, arch: str, bits: int, group_size: int, mode: str = "affine"):
        """The tiny checkpoint quantized by mlx-lm's own converter (skips where mlx-lm is not installed)."""
        key = ("mlx", arch, bits, group_size, mode)
        if key not in self._done:
            pytest.importorskip("mlx_lm")
            from mlx_lm.convert import convert as mlx_convert

            hf = hf_as_mlx_lm_reads_it(self.checkpoint(arch), self.root / f"hf-for-mlx-{arch}")
            out = self.root / f"mlx-{arch}-{bits}-g{group_size}-{mode}"
            mlx_convert(str(hf), str(out), quantize=True, q_bits=bits, q_group_size=group_size, q_mode=mode)
            self._done[key] = out
        return self._done[key]

    def mlx_store(self, arch: str, bits: int, group_size: int, mode: str = "affine"):
        key = ("mlx-store", arch, bits, group_size, mode)
        if key not in self._done:
            self._done[key] = convert(self.mlx_checkpoint(arch, bits, group_size, mode),
                                      self.root / f"store-mlx-{arch}-{bits}-g{group_size}-{mode}")
        return self._done[key]


    def gguf(self, arch: str, outtype: str, **overrides):
        """The tiny checkpoint as llama.cpp's own converter writes it (skips where its source is not at
        $FLASHMOE_LLAMA_CPP: .ci/run puts it there from llama-cpp-python's source distribution)."""
        key = ("gguf", arch, outtype, tuple(sorted(overrides.items())))
        if key not in self._done:
            llama = os.environ.get("FLASHMOE_LLAMA_CPP")
            if not llama or not os.path.isfile(os.path.join(llama, "convert_hf_to_gguf.py")):
                pytest.skip("llama.cpp's convert_hf_to_gguf.py is not at $FLASHMOE_LLAMA_CPP")
            suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            out = self.root / f"gguf-{arch}-{outtype}{suffix}" / f"tiny-{outtype}.gguf"
            out.parent.mkdir()
            tool = os.path.join(os.path.dirname(__file__), "tools", "llama_convert.py")
            done = subprocess.run([sys.executable, tool, llama, str(self.checkpoint(arch, **overrides)), str(out), outtype],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            self._done[key] = out
        return self._done[key]


def mlx_logits(folder, token_ids: list[int]) -> torch.Tensor:
    """mlx-lm's own forward pass over a checkpoint, in float32 (its bf16 run alone is ~1.6% off its float32 one on
    the tiny models): [T, vocab]."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    model, _ = load(str(folder))
    model.set_dtype(mx.float32)
    return torch.from_numpy(np.array(model(mx.array(token_ids)[None]).astype(mx.float32))[0])


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return Built(tmp_path_factory.mktemp("built"))


def load_reference(checkpoint, arch: str, **config_overrides):
    """transformers' own model for the checkpoint, in float32: our numerical reference."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3_5MoeForConditionalGeneration

    config = AutoConfig.from_pretrained(checkpoint)
    text = getattr(config, "text_config", config)
    for k, v in config_overrides.items():
        setattr(text, k, v)
    cls = Qwen3_5MoeForConditionalGeneration if arch == "qwen3_5_moe_vl" else AutoModelForCausalLM
    return cls.from_pretrained(checkpoint, config=config, dtype=torch.float32).eval()


def strict_json(text: str):
    """json.loads that refuses what Python alone accepts (NaN, Infinity): what a client in another language gets."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `flashmoe ARGS...` as a user would, in-process: (exit code, stdout, stderr); never a traceback."""
    from flashmoe import cli

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()  # what fixtures printed while building is not the command's
        monkeypatch.setattr(sys, "argv", ["flashmoe", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code or 0
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run


def edited_copy(folder, tmp_path, edit_config=None, edit_tensors=None):
    """A copy of a quantized checkpoint folder with its quantization_config and/or its tensors edited in place (the
    quantized-import tests' broken files)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    if edit_config:
        cfg = json.loads((copy / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (copy / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(copy / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def first_expert_tensor(tensors, suffix: str) -> str:
    return next(k for k in tensors if ".mlp.experts." in k and k.endswith(suffix))


def runs_on_the_gpu_as(store, expected: torch.Tensor, prompt: list[int]) -> None:
    """The store on the GPU, float32 and bf16, a prompt at once and token by token, against reference logits."""
    import flashmoe

    for dtype, bound in ((torch.float32, 0.01), (torch.bfloat16, 0.03)):
        model = flashmoe.load(store, device="cuda", dtype=dtype)
        assert rel_error(model.logits(prompt).cpu(), expected) < bound
        state = model.new_state()
        steps = [model.forward(prompt[:6], state).cpu()] + [model.forward([t], state).cpu() for t in prompt[6:]]
        assert rel_error(torch.cat(steps), expected) < bound


def weights_elsewhere(src, *dsts) -> dict[str, torch.Tensor]:
    """Copies of a checkpoint folder without its weights (config, tokenizer), for a test to write them in another
    format; returns the source's tensors."""
    import shutil

    from safetensors.torch import load_file

    for d in dsts:
        shutil.copytree(src, d)
        for f in d.glob("*.safetensors*"):
            f.unlink()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def blob_views(store, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """An expert's blob as the store holds it, read from disk: its named tensors (store.BlobLayout)."""
    loc = store.expert_location(layer, expert)
    with open(loc.path, "rb") as f:
        f.seek(loc.offset)
        return store.layout.unpack(torch.frombuffer(bytearray(f.read(loc.size)), dtype=torch.uint8))


def assert_runs_on_the_gpu(store, token_ids: list[int], ref: torch.Tensor) -> None:
    """The store on the GPU, float32 and bf16, prompt (grouped kernels) and decode (matrix-vector kernels in the
    CUDA graphs), against a reference's logits."""
    import flashmoe

    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 0.03)):
        model = flashmoe.load(store, device="cuda", dtype=dtype)
        assert model.routed.decode_kernels
        assert rel_error(model.logits(token_ids).cpu(), ref) < bound
        state = model.new_state()
        parts = [model.forward(token_ids[:6], state).cpu()] + [model.forward([t], state).cpu() for t in token_ids[6:]]
        assert rel_error(torch.cat(parts), ref) < bound


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm())
