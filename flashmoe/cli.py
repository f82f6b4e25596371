"""`flashmoe convert | generate | chat | serve | info | demo`: the command line. Errors print one line and exit
non-zero."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .errors import FlashMoeError, out_of_memory

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Mixture-of-Experts models larger than memory by streaming experts from SSD.")
console = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the terminal width


def say(text: str, style: str | None = None) -> None:
    """A message to stderr; never read as Rich markup, since paths and model text may hold [brackets]."""
    console.print(text, style=style, markup=False, highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def _bytes_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def run_convert(src: Path, dst: Path, bits: int | None | str, group_size: Optional[int], requantize: bool = False,
                revision: Optional[str] = None) -> Path:
    from .convert import Converter

    converter = Converter(src, dst, bits, group_size, requantize=requantize, revision=revision)
    cfg = converter.cfg
    what = f"{converter.bits}-bit, group {converter.group_size}" if converter.bits else "unquantized"
    if converter.quantized_source:
        what = (f"{converter.quantized_source} checkpoint, {what}, experts "
                f"{'repacked as they are' if converter.repack else 'requantized'}")
    if converter.gguf:
        types = sorted(t for group in converter.ckpt.expert_types(False) for t in group)
        what = f"GGUF with {'/'.join(types)} experts -> {what}"
    if converter.fp8_block:
        what = f"FP8 checkpoint (blocks {converter.fp8_block[0]}x{converter.fp8_block[1]}), dequantized -> {what}"
    say(f"converting {cfg.architecture}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts per layer "
        f"({what}) -> {dst}")
    if converter.remote:
        largest = max(converter.remote.shard_bytes(f) for f in converter.remote.files)
        say(f"downloading {converter.hub} shard by shard ({len(converter.remote.files)} shards): peak disk about "
            f"{human_bytes(converter.store_resident_bytes + converter.store_expert_bytes + 2 * largest)} (the store "
            "plus two shards in flight); each shard is deleted once converted")
    if not converter.gguf and not any((converter.src / name).is_file()
                                      for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        say(f"warning: {src} has no tokenizer files; generate, chat and serve need them: copy tokenizer.json and "
            "tokenizer_config.json into the store", style="yellow")
    try:
        with _bytes_progress() as progress:
            task = progress.add_task("convert", total=converter.total_source_bytes())
            converter.run(progress=lambda n: progress.advance(task, n), log=say)
    except KeyboardInterrupt:
        raise FlashMoeError("interrupted; run the same flashmoe convert command again to resume where it "
                            "stopped") from None
    say(f"done: {human_bytes(converter.store_resident_bytes)} resident, "
        f"{human_bytes(converter.store_expert_bytes)} of experts in {dst}")
    return dst


@app.command()
def convert(
    src: Path = typer.Argument(..., help="a Hugging Face Hub model (owner/name or hf://owner/name: downloaded "
                                         "shard by shard, nothing kept), or a checkpoint folder: Hugging Face "
                                         "safetensors (bf16/fp16/fp32, FP8 "
                                         "block-scaled, compressed-tensors INT4/INT8/FP8/NVFP4, GPTQ, AWQ, bitsandbytes), "
                                         "a llama.cpp "
                                         ".gguf file, or "
                                         "mlx-lm's quantized ones (mlx-community/*-4bit, imported "
                                         "as they are)"),
    dst: Path = typer.Argument(..., help="where to write the flashmoe store"),
    bits: Optional[str] = typer.Option(None, help="expert quantization: 4 (the default for float checkpoints), 8 or 2; "
                                                  "fp8 keeps an FP8 checkpoint's experts as they are"),
    no_quant: bool = typer.Option(False, "--no-quant", help="keep experts in the source dtype"),
    group_size: Optional[int] = typer.Option(None, help="weights per quantization group (default 64)"),
    requantize: bool = typer.Option(False, "--requantize", help="quantized source (MLX, compressed-tensors): quantize its experts again to --bits "
                                                                "(default 4) instead of importing them as they are"),
    revision: Optional[str] = typer.Option(None, help="Hub source: the branch, tag or commit to convert"),
):
    """Convert a checkpoint into a flashmoe store (streaming; re-run to resume an interrupted one)."""
    if no_quant and bits is not None:
        raise FlashMoeError("--no-quant keeps the source dtype; drop --bits, or drop --no-quant to quantize")
    if bits is not None and bits != "fp8" and not bits.isdigit():
        raise FlashMoeError(f"--bits is 2, 4, 8 or fp8, not {bits!r}")
    width = bits if bits in (None, "fp8") else int(bits)
    run_convert(src, dst, None if no_quant else "auto" if width is None else width, group_size, requantize, revision)


def stats_line(stats: dict) -> str:
    prefill = stats["prompt_tokens"] / (stats["prefill_ms"] / 1e3) if stats["prefill_ms"] else 0.0
    vram = f", VRAM cache hit rate {stats['vram_cache_hit_rate']:.0%}" if "vram_cache_hit_rate" in stats else ""
    in_ram = stats.get("experts_on_cpu", 0) + stats.get("experts_over_pcie", 0)
    if in_ram:
        vram += f", {stats['experts_on_cpu'] / in_ram:.0%} of the RAM-held experts computed on the CPU"
    return (f"{stats['generated_tokens']} tokens, {stats['decode_tokens_per_s']:.2f} tok/s decode, "
            f"{prefill:.1f} tok/s prefill, {stats['expert_bytes_read'] / 1e6:.1f} MB of experts read, "
            f"cache hit rate {stats['cache_hit_rate']:.0%}{vram} | attention {stats['attention_ms']:.0f} ms, "
            f"routing {stats['routing_ms']:.0f} ms, expert I/O {stats['expert_io_ms']:.0f} ms, "
            f"expert compute {stats['expert_compute_ms']:.0f} ms")


# options shared by the commands that load a model
DEVICE = typer.Option("cpu", "--device", "--devices",
                      help="cpu, cuda (cuda:N), or several GPUs (cuda:0,cuda:1): each then holds a block of layers "
                           "and their experts")
EXPERTS_PER_TOKEN = typer.Option(None, min=1, help="override the router's K (renormalised)")
CACHE_GB = typer.Option(None, min=0.0, help="RAM for cached experts (default on the CPU: all of them if they take at "
                                            "most half of the free RAM, else 1/8 of RAM; on a GPU, pinned: all of "
                                            "them if the VRAM cache cannot hold them and they take at most half of "
                                            "the free RAM, else none, the page cache serving)")
WARM = typer.Option(True, "--warm/--no-warm", help="where one expert cache has room for every expert, read them all "
                    "in first, so no reply waits on the disk; on a GPU then compile and tune the prompt kernels")


VRAM_CACHE_GB = typer.Option(None, min=0.0, help="VRAM for cached experts, with --device cuda (default: what the "
                                                 "resident weights leave, less 4 GB)")
DIRECT_IO = typer.Option(False, "--direct-io", help="read experts with O_DIRECT, bypassing the page cache")
CACHE_POLICY = typer.Option("reuse-frequency", help="which cached expert gives up its slot: reuse-frequency, "
                                                    "frequency-lru, lru or decayed-lfu")
RESIDENT_FORMAT = typer.Option(None, help="the resident projections as float, bf16 (CPU), int8 or int4 (quantized at "
                                          "load; on the CPU int8 is the default for a quantized store, on a GPU "
                                          "the first of float, int8, int4 that takes at most half of the free "
                                          "VRAM: int8/int4 leave more VRAM for experts)")
CPU_SHARE = typer.Option("0", help="GPU: of the experts read from pinned RAM, the share the CPU computes meanwhile "
                                   "(0 to 1, or auto: set by measured times; default 0)")


def _cpu_share(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise FlashMoeError(f"--cpu-share is a number from 0 to 1, or auto, not {value!r}") from None


def _top_p_in_range(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be > 0 and <= 1, not {value}")
    return value


def top_p_option(default: float):
    return typer.Option(default, callback=_top_p_in_range,
                        help="nucleus sampling: sample among the likeliest tokens holding this much probability, "
                             "in (0, 1]; 1 keeps all")


def load_model(store: Path, **load_options):
    from . import load

    device = load_options.pop("device", "cpu")
    if "," in device:  # several GPUs: placement.py spreads the layers over them
        load_options["devices"] = device
    else:
        load_options["device"] = device
    model = load(store, **load_options)
    say(placement_line(model.placement()), style="dim")
    return model


def placement_line(p: dict) -> str:
    """Where the weights went, said at load."""
    tiers = [f"VRAM cache {human_bytes(p['vram_cache_bytes'])} ({p['vram_cache_share']:.0%} of them)"] if (
        "vram_cache_bytes" in p) else []
    tiers.append(f"{'pinned ' if p['ram_pinned'] else ''}RAM cache {human_bytes(p['ram_cache_bytes'])} "
                 f"({p['ram_cache_share']:.0%})")
    blocks = "".join(f"; {b['device']}: layers {b['layers'][0]}-{b['layers'][1]}" + (
        f", VRAM cache {human_bytes(b['vram_cache_bytes'])}" if "vram_cache_bytes" in p else "")
        for b in p.get("blocks", []))
    if "rank" in p:
        r = p["rank"]
        blocks += f"; rank {r['rank']} of {r['ranks']}: layers {r['layers'][0]}-{r['layers'][1]}"
    return (f"resident weights {human_bytes(p['resident_bytes'])} on {p['device']}; experts "
            f"{human_bytes(p['expert_bytes'])}: {', '.join(tiers)}, the rest read from disk as needed{blocks}")


def run_generate(store: Path, prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float,
                 top_k: int, seed: Optional[int], system: Optional[str] = None, thinking: Optional[bool] = None,
                 echo: bool = False, **load_options) -> dict:
    from .textstream import IncrementalDecoder

    model = load_model(store, **load_options)
    out = sys.stdout
    if model.pipeline is not None and not model.pipeline.first:  # one rank of several: rank 0 speaks for them all
        out, console.quiet = open(os.devnull, "w"), True
    try:
        tok = model.tokenizer
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = model.encode_chat(messages, **({} if thinking is None else {"enable_thinking": thinking}))
        else:
            ids = tok(prompt)["input_ids"]
        limit = model.config.max_position_embeddings
        if len(ids) >= limit:
            raise FlashMoeError(f"the prompt is {len(ids)} tokens; the model's context is {limit}")
        decoder = IncrementalDecoder(tok)
        if echo:  # the continuation reads on from the prompt
            out.write(prompt)
        for token in model.generate(list(ids), min(max_tokens, limit - len(ids)), temperature, top_p, top_k, seed):
            out.write(decoder.add(token))
            out.flush()
        out.write(decoder.flush() + "\n")
        stats = model.stats
        say(stats_line(stats), style="dim")
        return stats
    finally:
        model.close()
        if out is not sys.stdout:
            out.close()


@app.command()
def generate(
    store: Path = typer.Argument(..., help="a flashmoe store made by `flashmoe convert`"),
    prompt: str = typer.Option(..., help="the prompt text"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    system: Optional[str] = typer.Option(None, help="a system prompt (implies --chat)"),
    thinking: Optional[bool] = typer.Option(None, "--thinking/--no-thinking",
                                            help="the template's thinking switch (implies --chat)"),
    max_tokens: int = typer.Option(128, min=1, help="most new tokens to generate (the context permitting)"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy"),
    top_p: float = top_p_option(1.0),
    top_k: int = typer.Option(0, min=0),
    seed: Optional[int] = typer.Option(None),
    experts_per_token: Optional[int] = EXPERTS_PER_TOKEN,
    cache_gb: Optional[float] = CACHE_GB,
    vram_cache_gb: Optional[float] = VRAM_CACHE_GB,
    direct_io: bool = DIRECT_IO,
    cache_policy: str = CACHE_POLICY,
    resident_format: Optional[str] = RESIDENT_FORMAT,
    cpu_share: str = CPU_SHARE,
    device: str = DEVICE,
    distributed: bool = typer.Option(False, "--distributed", help="one rank of several processes (launch with "
                                     "torchrun --nproc-per-node N -m flashmoe generate ... --distributed): each holds "
                                     "a block of layers on its --device (cuda: its local rank's GPU)"),
):
    """Generate text, streaming it as it is made, then print a stats line."""
    chat = chat or system is not None or thinking is not None
    run_generate(store, prompt, chat, max_tokens, temperature, top_p, top_k, seed, system, thinking, device=device,
                 experts_per_token=experts_per_token, cache_gb=cache_gb, vram_cache_gb=vram_cache_gb,
                 direct_io=direct_io, cache_policy=cache_policy, resident_format=resident_format,
                 cpu_share=_cpu_share(cpu_share), **({"distributed": True} if distributed else {}))


@app.command()
def chat(
    store: Path = typer.Argument(..., help="a flashmoe store made by `flashmoe convert`"),
    system: Optional[str] = typer.Option(None, help="a system prompt"),
    max_tokens: int = typer.Option(1024, min=1, help="most new tokens per reply"),
    temperature: float = typer.Option(0.7, min=0.0, help="0 is greedy"),
    top_p: float = top_p_option(0.95),
    thinking: bool = typer.Option(True, "--thinking/--no-thinking", help="the template's thinking switch"),
    prefix_cache_gb: float = typer.Option(1.0, min=0.0, help="RAM for sequence states kept between turns, so each "
                                          "turn prefills only what is new (0: off)"),
    experts_per_token: Optional[int] = EXPERTS_PER_TOKEN,
    cache_gb: Optional[float] = CACHE_GB,
    vram_cache_gb: Optional[float] = VRAM_CACHE_GB,
    direct_io: bool = DIRECT_IO,
    cache_policy: str = CACHE_POLICY,
    resident_format: Optional[str] = RESIDENT_FORMAT,
    cpu_share: str = CPU_SHARE,
    device: str = DEVICE,
    warm: bool = WARM,
):
    """Chat in the terminal: replies stream, history is kept; /reset clears it, /exit (or Ctrl-D) leaves."""
    from .terminal_chat import TerminalChat

    model = load_model(store, device=device, experts_per_token=experts_per_token, cache_gb=cache_gb,
                       vram_cache_gb=vram_cache_gb, direct_io=direct_io, cache_policy=cache_policy,
                       resident_format=resident_format, prefix_cache_gb=prefix_cache_gb, cpu_share=_cpu_share(cpu_share))
    try:
        if warm:
            _warm_experts(model, "chatting")
            model.warm_prompts()
        TerminalChat(model, console, system, max_tokens, temperature, top_p, thinking).run()
    finally:
        model.close()


def _warm_experts(model, before: str) -> None:
    """Every expert read into the caches where one tier holds them all (else the first tokens read theirs from disk
    one by one, at a fraction of the decode rate), with a progress bar."""
    if not model.caches_hold_every_expert:
        return
    layers = sum(len(s.fetcher.layers) for s in model.stages)  # this process's (a rank's own)
    total = layers * model.config.num_experts * model.store.expert_blob_bytes
    say(f"reading every expert into the caches ({human_bytes(total)}) before {before}")
    with _bytes_progress() as progress:
        task = progress.add_task("experts", total=total)
        model.warm_cache(progress=lambda n: progress.advance(task, n))


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FlashMoeError(f"cannot listen on {host}: {exc.strerror}; pass another --host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            raise FlashMoeError(f"cannot listen on {host}:{port}: {exc.strerror}; pass another --port or stop what "
                                "holds it") from None


@app.command()
def serve(
    store: Path = typer.Argument(..., help="a flashmoe store made by `flashmoe convert`"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, envvar="FLASHMOE_API_KEY",
                                          help="require 'Authorization: Bearer KEY' (or x-api-key: KEY) on /v1 "
                                               "(or set FLASHMOE_API_KEY)"),
    model_name: Optional[str] = typer.Option(None, help="the model id clients send (default: the store's folder name)"),
    max_concurrent: int = typer.Option(4, min=1, help="requests generating at once, a step of each in turn"),
    batch_steps: Optional[bool] = typer.Option(None, "--batch-steps/--no-batch-steps",
                                               help="one forward for all running requests a step, their experts read "
                                                    "once for all (default: on the CPU, and on a GPU holding every "
                                                    "expert, where the batch's step is one CUDA graph)"),
    max_queue: int = typer.Option(64, min=0, help="requests that may wait; more get 503"),
    prefill_chunk: int = typer.Option(512, min=1, help="a prompt goes through this many tokens at a time, the running "
                                                       "streams' next tokens in between"),
    prefix_cache_gb: float = typer.Option(1.0, min=0.0, help="RAM for sequence states kept at the ends of prompts and "
                                          "replies, so a chat's next turn prefills only its new tokens (0: off; "
                                          "not with --distributed)"),
    experts_per_token: Optional[int] = EXPERTS_PER_TOKEN,
    cache_gb: Optional[float] = CACHE_GB,
    vram_cache_gb: Optional[float] = VRAM_CACHE_GB,
    direct_io: bool = DIRECT_IO,
    cache_policy: str = CACHE_POLICY,
    resident_format: Optional[str] = RESIDENT_FORMAT,
    cpu_share: str = CPU_SHARE,
    device: str = DEVICE,
    warm: bool = typer.Option(True, "--warm/--no-warm", help="where one expert cache has room for every expert, "
                              "read them all in before serving, so no request waits on the disk; then compile and "
                              "tune the prompt kernels and capture the batch graphs up to --max-concurrent sequences"),
    distributed: bool = typer.Option(False, "--distributed", help="one rank of several processes (launch with "
                                     "torchrun --nproc-per-node N -m flashmoe serve ... --distributed): rank 0 serves, "
                                     "each rank holds a block of layers on its --device"),
):
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), Anthropic's (/v1/messages), /health and
    /metrics."""
    import uvicorn

    from .server import ServedModel, create_app

    leader = int(os.environ.get("RANK", 0)) == 0 if distributed else True
    if leader:
        _check_port_free(host, port)  # before the minutes a big model takes to load
    model = load_model(store, device=device, experts_per_token=experts_per_token, cache_gb=cache_gb,
                       vram_cache_gb=vram_cache_gb, direct_io=direct_io, cache_policy=cache_policy,
                       resident_format=resident_format, cpu_share=_cpu_share(cpu_share),
                       **({"distributed": True} if distributed else {"prefix_cache_gb": prefix_cache_gb}))
    if warm:
        _warm_experts(model, "serving")
    if model.pipeline is not None:
        model.pipeline.led = True
        if not leader:  # the other ranks run what rank 0 announces
            try:
                model.follow()
            finally:
                model.close()
            return
    name = model_name or Path(store).resolve().name
    served = ServedModel(model, name, max_active=max_concurrent, max_waiting=max_queue, prefill_chunk=prefill_chunk,
                         batch_steps=batch_steps)
    if warm:  # on a GPU: the prompt kernels and every batch size's graph compiled now, not mid-request
        model.warm_prompts(prefill_chunk)
        model.warm_batches(max_concurrent)
    say(f"serving {name} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    # the model stays in this thread, the one that loaded it (scheduler.py: on the CPU a second thread decoded at
    # half the speed); the HTTP side gets a thread of its own, and SIGTERM stops both as Ctrl-C does
    http = uvicorn.Server(uvicorn.Config(create_app(served, api_key=api_key), host=host, port=port, log_level="info"))
    served.scheduler.runs_in_caller = True

    def serve_http() -> None:
        try:
            http.run()
        except SystemExit:  # how uvicorn stops when it cannot start: reported once the worker's loop ends
            pass
        finally:  # the HTTP side ended (shut down, or it could not start): so does the worker
            served.scheduler.stop()

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    thread = threading.Thread(target=serve_http, name="flashmoe-http", daemon=True)
    thread.start()
    try:
        served.scheduler.run()
    except KeyboardInterrupt:
        pass
    finally:
        http.should_exit = True
        thread.join(timeout=60)
        model.close()
    if not http.started:  # uvicorn said why above (its exit in the HTTP thread ends only that thread)
        raise FlashMoeError(f"the HTTP server did not start on {host}:{port}; see uvicorn's message above")


@app.command()
def info(
    store: Path = typer.Argument(..., help="a flashmoe store"),
    verify: bool = typer.Option(False, "--verify", help="re-read every expert and check its checksum"),
):
    """Describe a store: architecture, resident vs expert bytes, quantization, K."""
    from . import residents
    from .models import family_of
    from .store import Store

    s = Store(store)
    cfg, q = s.config, s.quantization
    quant = f"{q['bits']}-bit affine, group {q['group_size']}" if q["bits"] else f"none ({q['source_dtype']})"
    if q.get("scheme") == "mxfp4":
        quant = "MXFP4 (e2m1 codes, an e8m0 scale per 32)"
    elif q.get("scheme") == "fp8":
        quant = f"FP8 e4m3, kept as the checkpoint has it (a scale per row per {q['group_size']} columns)"
    elif q["bits"] and q.get("scale_dtype", "float16") != "float16":
        quant += f", {q['scale_dtype']} scales"
    source = s.manifest["source"]
    imported = {"mlx": "MLX", "gguf": "GGUF", "compressed-tensors": "compressed-tensors", "mxfp4": "MXFP4",
                "fp8": "FP8", "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes"}.get(
        source.get("format") if source.get("format") in ("mlx", "gguf")
        else (source.get("quantization") or {}).get("method"))
    if imported:
        quant += f" ({imported} checkpoint, experts {source.get('experts', 'repacked')}"
        for key, how in (("repacked_from", "repacked from"), ("requantized_from", "requantized from")):
            if source.get(key):
                quant += f"; {how} " + ", ".join(f"{k} x{v}" for k, v in source[key].items())
        quant += ")"
    resident = human_bytes(s.resident_bytes)
    if s.resident_quantized:
        widths = sorted({v["bits"] for v in s.resident_quantized.values()})
        resident += f" ({len(s.resident_quantized)} matrices kept at {'/'.join(map(str, widths))} bits)"
    lines = [
        ("architecture", cfg.architecture),
        *family_of(cfg.architecture).describe(cfg),
        ("hidden / expert intermediate", f"{cfg.hidden_size} / {cfg.moe_intermediate_size}"),
        ("quantization", quant),
        ("resident", resident),
        ("resident on a GPU", ", ".join(f"{human_bytes(n)} {'bf16' if fmt == 'float' else fmt}"
                                        for fmt, n in residents.gpu_bytes(s).items())
         + " (--resident-format; default: the first within half the free VRAM)"),
        ("expert weights", f"{human_bytes(s.expert_bytes)} ({human_bytes(s.expert_blob_bytes)} per expert)"),
        ("read per token", f"{human_bytes(s.expert_blob_bytes * cfg.num_experts_per_tok * len(cfg.moe_layers))} "
                           f"of experts at K={cfg.num_experts_per_tok} (before caching)"),
    ]
    for key, value in lines:
        typer.echo(f"{key:>30}: {value}")
    if verify:
        with _bytes_progress() as progress:
            task = progress.add_task("verify", total=s.verify_bytes)
            problems = s.verify(progress=lambda n: progress.advance(task, n))
        if problems:
            raise FlashMoeError("corrupt store: " + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
        n = len(s.resident_crc32)
        resident = (f"{n} resident file checksum{'s match' if n > 1 else ' matches'}" if n else
                    "the resident files have no checksums (a store from an older flashmoe)")
        typer.echo(f"{'verify':>30}: all {s.expert_bytes // s.expert_blob_bytes} expert checksums match; {resident}")


@app.command()
def demo(
    arch: Optional[str] = typer.Option(None, help="instead of the trained model, a random-weight checkpoint of this "
                                                  "family built with transformers: qwen3_5_moe, qwen3_5_moe_vl, "
                                                  "qwen3_next, qwen3_moe, mixtral, glm4_moe, deepseek_v3 or minimax_m2"),
    workdir: Optional[Path] = typer.Option(None, help="with --arch: where to put the checkpoint and store "
                                                      "(default: a temp dir)"),
    max_tokens: int = typer.Option(48, min=1),
):
    """Run the small MoE that ships with flashmoe (trained on English documentation; no download), or with --arch
    build a random-weight checkpoint of another family, convert it and generate from it."""
    if arch is None:
        from .data import SMALL_MOE

        if workdir is not None:
            raise FlashMoeError("--workdir is for --arch (a model to build); the shipped one is built already")

        typer.echo(f"$ flashmoe info {SMALL_MOE}")
        info(SMALL_MOE, verify=False)
        say("a continuation (sampled, temperature 0.6, seed 0):")
        run_generate(SMALL_MOE, "Python is", False, max_tokens, 0.6, 0.95, 0, 0, echo=True, cache_gb=0.01)
        say("a question, in the chat template (greedy, thinking off):")
        typer.echo("> What does `tar` do?")
        run_generate(SMALL_MOE, "What does `tar` do?", True, max_tokens, 0.0, 1.0, 0, None, thinking=False,
                     cache_gb=0.01)
        say("a 49M-weight model trained for 13 minutes: it writes English, not facts (MODEL_CARD.md in the store)")
        return
    from .tiny import ARCHITECTURES, build_tiny_checkpoint

    if arch not in ARCHITECTURES:
        raise FlashMoeError(f"--arch must be one of {', '.join(ARCHITECTURES)}")
    with tempfile.TemporaryDirectory(prefix="flashmoe-demo-") as tmp:
        root = workdir or Path(tmp)
        checkpoint, store = root / "checkpoint", root / "store"
        for p in (checkpoint, store):
            if p.exists():
                raise FlashMoeError(f"{p} already exists; pass another --workdir")
        say(f"building a random-weight {arch} checkpoint with transformers in {checkpoint}")
        try:
            build_tiny_checkpoint(checkpoint, arch, num_hidden_layers=8, num_experts=64, hidden_size=256,
                                  moe_intermediate_size=128, max_shard_size="2MB")
        except OSError as exc:
            raise FlashMoeError(f"cannot write to {root}: {exc.strerror or exc}; pass a writable --workdir") from None
        run_convert(checkpoint, store, 4, 64)
        typer.echo(f"$ flashmoe info {store}")
        info(store, verify=False)
        say("generating (random weights, so the text is noise; the mechanics are real):")
        run_generate(store, "Write a haiku about the sea.", True, max_tokens, 0.8, 0.95, 0, 0, cache_gb=0.002)


def main() -> None:
    try:
        app()  # usage errors are typer's: a message and exit code 2
    except Exception as exc:
        error = exc if isinstance(exc, FlashMoeError) else out_of_memory(exc)
        if error is None:
            raise
        from rich.text import Text  # the message as written: a path with [brackets] in it is not Rich markup

        console.print(Text.assemble(("error:", "bold red"), f" {error}"))
        sys.exit(1)


if __name__ == "__main__":
    main()
