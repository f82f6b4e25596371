"""`flashmoe convert | generate | info | demo`: the command line. Errors print one line and exit non-zero."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .errors import FlashMoeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Mixture-of-Experts models larger than memory by streaming experts from SSD.")
console = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the terminal width


def _bytes_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def run_convert(src: Path, dst: Path, bits: Optional[int], group_size: int) -> Path:
    from .convert import Converter

    converter = Converter(src, dst, bits, group_size)
    cfg = converter.cfg
    what = f"{bits}-bit, group {group_size}" if bits else "unquantized"
    console.print(f"converting {cfg.architecture}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts "
                  f"per layer ({what}) -> {dst}")
    with _bytes_progress() as progress:
        task = progress.add_task("convert", total=converter.total_source_bytes())
        converter.run(progress=lambda n: progress.advance(task, n), log=console.print)
    console.print(f"done: {converter.store_resident_bytes / 1e9:.3f} GB resident, "
                  f"{converter.store_expert_bytes / 1e9:.3f} GB of experts in {dst}")
    return dst


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Hugging Face checkpoint folder (config.json + *.safetensors)"),
    dst: Path = typer.Argument(..., help="where to write the flashmoe store"),
    bits: int = typer.Option(4, help="expert quantization: 4 (default), 8 or 2"),
    no_quant: bool = typer.Option(False, "--no-quant", help="keep experts in the source dtype"),
    group_size: int = typer.Option(64, help="weights per quantization group"),
):
    """Convert a checkpoint into a flashmoe store (streaming; re-run to resume an interrupted one)."""
    run_convert(src, dst, None if no_quant else bits, group_size)


class StreamPrinter:
    """Prints decoded text as tokens arrive, holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new


def stats_line(stats: dict) -> str:
    prefill = stats["prompt_tokens"] / (stats["prefill_ms"] / 1e3) if stats["prefill_ms"] else 0.0
    vram = f", VRAM cache hit rate {stats['vram_cache_hit_rate']:.0%}" if "vram_cache_hit_rate" in stats else ""
    return (f"{stats['generated_tokens']} tokens, {stats['decode_tokens_per_s']:.2f} tok/s decode, "
            f"{prefill:.1f} tok/s prefill, {stats['expert_bytes_read'] / 1e6:.1f} MB of experts read, "
            f"cache hit rate {stats['cache_hit_rate']:.0%}{vram} | attention {stats['attention_ms']:.0f} ms, "
            f"routing {stats['routing_ms']:.0f} ms, expert I/O {stats['expert_io_ms']:.0f} ms, "
            f"expert compute {stats['expert_compute_ms']:.0f} ms")


def run_generate(store: Path, prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float,
                 top_k: int, seed: Optional[int], **load_options) -> dict:
    from . import load

    model = load(store, **load_options)
    tok = model.tokenizer
    if chat:
        ids = model.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tok(prompt)["input_ids"]
    printer = StreamPrinter(tok)
    for token in model.generate(list(ids), max_tokens, temperature, top_p, top_k, seed):
        sys.stdout.write(printer.add(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = model.stats
    console.print(stats_line(stats), style="dim")
    model.close()
    return stats


@app.command()
def generate(
    store: Path = typer.Argument(..., help="a flashmoe store made by `flashmoe convert`"),
    prompt: str = typer.Option(..., help="the prompt text"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    max_tokens: int = typer.Option(128, min=1, help="most new tokens to generate"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    top_k: int = typer.Option(0, min=0),
    seed: Optional[int] = typer.Option(None),
    experts_per_token: Optional[int] = typer.Option(None, min=1, help="override the router's K (renormalised)"),
    cache_gb: Optional[float] = typer.Option(
        None, min=0.0, help="RAM for cached experts (default: 1/8 of RAM on the CPU; on a GPU none, the page cache "
                            "serves, and a set size is pinned)"),
    vram_cache_gb: Optional[float] = typer.Option(
        None, min=0.0, help="VRAM for cached experts, with --device cuda (default: what the resident weights leave, "
                            "less 4 GB)"),
    direct_io: bool = typer.Option(False, "--direct-io", help="read experts with O_DIRECT, bypassing the page cache"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
):
    """Generate text, streaming it as it is made, then print a stats line."""
    run_generate(store, prompt, chat, max_tokens, temperature, top_p, top_k, seed, device=device,
                 experts_per_token=experts_per_token, cache_gb=cache_gb, vram_cache_gb=vram_cache_gb,
                 direct_io=direct_io)


@app.command()
def info(
    store: Path = typer.Argument(..., help="a flashmoe store"),
    verify: bool = typer.Option(False, "--verify", help="re-read every expert and check its checksum"),
):
    """Describe a store: architecture, resident vs expert bytes, quantization, K."""
    from .store import Store

    s = Store(store)
    cfg, q = s.config, s.quantization
    quant = f"{q['bits']}-bit affine, group {q['group_size']}" if q["bits"] else f"none ({q['source_dtype']})"
    lines = [
        ("architecture", cfg.architecture),
        ("layers", f"{cfg.num_hidden_layers} ({cfg.layer_types.count('full_attention')} full attention, "
                   f"{cfg.layer_types.count('linear_attention')} Gated DeltaNet)"),
        ("experts", f"{cfg.num_experts} per layer, K={cfg.num_experts_per_tok}, "
                    f"shared expert {cfg.shared_expert_intermediate_size}"),
        ("hidden / expert intermediate", f"{cfg.hidden_size} / {cfg.moe_intermediate_size}"),
        ("quantization", quant),
        ("resident bytes", f"{s.resident_bytes / 1e9:.3f} GB"),
        ("expert bytes", f"{s.expert_bytes / 1e9:.3f} GB ({s.expert_blob_bytes / 1e6:.3f} MB per expert)"),
        ("bytes read per token", f"{s.expert_blob_bytes * cfg.num_experts_per_tok * len(cfg.moe_layers) / 1e6:.1f} MB "
                                 f"of experts at K={cfg.num_experts_per_tok} (before caching)"),
    ]
    for key, value in lines:
        typer.echo(f"{key:>30}: {value}")
    if verify:
        with _bytes_progress() as progress:
            task = progress.add_task("verify", total=s.expert_bytes)
            problems = s.verify(progress=lambda n: progress.advance(task, n))
        if problems:
            raise FlashMoeError("corrupt store: " + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
        typer.echo(f"{'verify':>30}: all {s.expert_bytes // s.expert_blob_bytes} expert checksums match")


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="where to put the checkpoint and store (default: a temp dir)"),
    arch: str = typer.Option("qwen3_5_moe", help="qwen3_5_moe, qwen3_5_moe_vl or qwen3_next"),
    max_tokens: int = typer.Option(32, min=1),
):
    """Build a small random-weight checkpoint with transformers, convert it, and generate from it (no download)."""
    from .tiny import ARCHITECTURES, build_tiny_checkpoint

    if arch not in ARCHITECTURES:
        raise FlashMoeError(f"--arch must be one of {', '.join(ARCHITECTURES)}")
    with tempfile.TemporaryDirectory(prefix="flashmoe-demo-") as tmp:
        root = workdir or Path(tmp)
        checkpoint, store = root / "checkpoint", root / "store"
        for p in (checkpoint, store):
            if p.exists():
                raise FlashMoeError(f"{p} already exists; pass another --workdir")
        console.print(f"building a random-weight {arch} checkpoint with transformers in {checkpoint}")
        build_tiny_checkpoint(checkpoint, arch, num_hidden_layers=8, num_experts=64, hidden_size=256,
                              moe_intermediate_size=128, max_shard_size="2MB")
        run_convert(checkpoint, store, 4, 64)
        typer.echo(f"$ flashmoe info {store}")
        info(store, verify=False)
        console.print("generating (random weights, so the text is noise; the mechanics are real):")
        run_generate(store, "Write a haiku about the sea.", True, max_tokens, 0.8, 0.95, 0, 0, cache_gb=0.002)


def main() -> None:
    try:
        app()  # usage errors are typer's: a message and exit code 2
    except FlashMoeError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
