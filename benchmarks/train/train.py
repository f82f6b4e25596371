"""Train the small MoE flashmoe ships (issue 13): transformers' Qwen3_5MoeForCausalLM (the seed family: Gated DeltaNet
and gated attention, a shared expert), from scratch, on corpus.py's text, in runs of a few minutes that resume.

    python benchmarks/train/train.py --corpus /data/corpus --out /data/run --minutes 9 [--steps 6000] [--preset small]
    python benchmarks/train/train.py --corpus /data/corpus --out /data/run --export /data/run/hf   # for convert

The first run trains the tokenizer (byte-level BPE, the Qwen3.5 chat template of flashmoe.tiny, so chat, thinking
and tool calls render as the real models' do) and tokenizes the corpus once (uint16 arrays beside the checkpoint):
its documents, then chats.py's chats (when the corpus folder has them) as the template renders them.
Each run trains until --minutes have passed or --steps are done, then saves the checkpoint atomically (weights,
optimizer, step; also at every evaluation): the next run goes on from it. `--steps auto` fits the schedule to the
first run's --minutes: after CALIBRATE steps it measures the rate and fixes the step count (logged and kept in the
checkpoint, which later runs follow: pass it as --steps to redo the run elsewhere). The weights with the best held-out
loss so far are kept in best.pt, and --export writes those (the last ones unless held-out loss rose: too many epochs
of a small corpus). Deterministic given --seed: step s reads the windows a generator seeded with (seed, s) picks, so a
run cut into pieces trains on what an uncut one would (tests/test_train.py).
The schedule: linear warm-up over WARMUP steps, then cosine to a tenth of --lr at --steps. The routers'
load-balancing loss is on (transformers' own, router_aux_loss_coef). Every --eval-every steps and at the end of a
run: the held-out loss over fixed windows. Progress goes to log.jsonl (step, loss, lr, tokens/s, held-out loss).
On the device, the runs are calls made back to back (its disk lasts while it stays warm); pack.py brings the export
back in parts (its calls return at most 8 files of 16 MiB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

WARMUP = 200
CALIBRATE = 40  # steps timed (after the first 10: compilation, allocation) before --steps auto is fixed
EOS = "<|endoftext|>"
# "small": 8 layers (every 4th attention) at hidden 320, 32 experts of 160, K=4, tied embeddings: 49M weights, 39M
# of them experts; 22 MB of 4-bit experts (group 64) and 20 MB of bf16 residents: the store of about 40 MB
PRESETS = {
    "small": dict(vocab_size=8192, hidden_size=320, num_hidden_layers=8, num_attention_heads=5, num_key_value_heads=1,
                  head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                  linear_value_head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=160,
                  shared_expert_intermediate_size=320, max_position_embeddings=4096, tie_word_embeddings=True),
    "test": dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
                 linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                 shared_expert_intermediate_size=16, max_position_embeddings=256,
                 layer_types=["linear_attention", "full_attention"]),
}


def tokenizer_for(corpus: Path, out: Path, vocab_size: int):
    """The tokenizer in out/tokenizer (trained on the training split once, then loaded)."""
    from transformers import AutoTokenizer

    from flashmoe.tiny import build_tokenizer

    where = out / "tokenizer"
    if not (where / "tokenizer.json").exists():
        with open(corpus / "train.txt", encoding="utf-8") as f:
            tok = build_tokenizer(vocab_size, corpus=(line for line in f))
        tok.save_pretrained(str(where))
    return AutoTokenizer.from_pretrained(str(where))


def tokens_of(corpus: Path, out: Path, split: str, tok) -> np.ndarray:
    """The split's token ids (documents joined by <|endoftext|>), cached as out/tokens-SPLIT.npy."""
    path = out / f"tokens-{split}.npy"
    if not path.exists():
        eos = tok.convert_tokens_to_ids(EOS)
        docs = [d for d in (corpus / f"{split}.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
        docs += chat_texts(corpus / f"chats-{split}.jsonl", tok)
        ids = []
        for start in range(0, len(docs), 4096):  # batches: the tokenizer encodes them on every core
            for doc in tok(docs[start : start + 4096], add_special_tokens=False)["input_ids"]:
                ids.extend(doc)
                ids.append(eos)
        assert max(ids) < 2 ** 16
        np.save(path.with_suffix(".tmp.npy"), np.asarray(ids, dtype=np.uint16))
        os.replace(path.with_suffix(".tmp.npy"), path)
    return np.load(path, mmap_mode="r")


def chat_texts(path: Path, tok) -> list[str]:
    """chats.py's chats as the model reads them: the prompt the chat template makes with thinking off (the empty
    think block), the answer, the end of the turn."""
    if not path.exists():
        return []
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        user, answer = json.loads(line)["messages"]
        prompt = tok.apply_chat_template([user], add_generation_prompt=True, enable_thinking=False, tokenize=False)
        texts.append(prompt + answer["content"] + "<|im_end|>\n")
    return texts


def model_config(preset: str, vocab_size: int, tok):
    from flashmoe.tiny import tiny_config

    shape = {**PRESETS[preset], "vocab_size": vocab_size}
    return tiny_config("qwen3_5_moe", **{"tie_word_embeddings": False, **shape}, output_router_logits=True,
                       router_aux_loss_coef=0.001, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tok.convert_tokens_to_ids(EOS))


def batch_at(tokens: np.ndarray, step: int, seed: int, batch: int, seq: int) -> torch.Tensor:
    """Step `step`'s windows of seq + 1 tokens: where a generator seeded with (seed, step) puts them."""
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq - 1, batch)
    return torch.from_numpy(np.stack([tokens[s : s + seq + 1].astype(np.int64) for s in starts]))


def lr_at(step: int, steps: int, peak: float) -> float:
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    done = min(1.0, (step - WARMUP) / max(1, steps - WARMUP))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


@torch.no_grad()
def held_out_loss(model, tokens: np.ndarray, seq: int, windows: int, device) -> float:
    """Mean next-token loss over `windows` evenly spaced windows of the held-out split (the same ones every time)."""
    model.eval()
    starts = np.linspace(0, len(tokens) - seq - 1, windows).astype(np.int64)
    total = 0.0
    for s in starts:
        ids = torch.from_numpy(tokens[s : s + seq + 1].astype(np.int64))[None].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(ids[:, :-1], use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    model.train()
    return total / len(starts)


def save(path: Path, state: dict) -> None:
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def train(args) -> dict:
    from transformers import Qwen3_5MoeForCausalLM

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = tokenizer_for(args.corpus, args.out, PRESETS[args.preset]["vocab_size"])
    train_tokens, heldout = (tokens_of(args.corpus, args.out, s, tok) for s in ("train", "heldout"))
    torch.manual_seed(args.seed)
    cfg = model_config(args.preset, len(tok), tok)
    cfg._experts_implementation = args.experts  # how transformers runs the experts; the same weights either way
    model = Qwen3_5MoeForCausalLM(cfg).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ckpt, best_path, step, steps, best = args.out / "checkpoint.pt", args.out / "best.pt", 0, args.steps, math.inf
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        step, steps, best = state["step"], state.get("steps", steps), state.get("best", best)
        if args.steps not in ("auto", steps):
            raise SystemExit(f"--steps {args.steps}: {ckpt}'s schedule has {steps} steps; pass that, or auto")
    log = open(args.out / "log.jsonl", "a")
    t_start = t_last = time.perf_counter()
    last_step, t_step, result, t_cal = step, step, {}, None
    model.train()

    def checkpoint():
        save(ckpt, {"model": model.state_dict(), "optim": optim.state_dict(), "step": step, "steps": steps,
                    "best": best})

    def evaluate():
        nonlocal best
        loss = round(held_out_loss(model, heldout, args.seq, args.eval_windows, device), 4)
        if loss < best:
            best = loss
            save(best_path, {"model": model.state_dict(), "step": step, "heldout_loss": loss})
        return loss

    while (steps == "auto" or step < steps) and (args.run_steps is None or step < last_step + args.run_steps) \
            and (time.perf_counter() - t_start) < args.minutes * 60:
        if steps == "auto" and step in (10, 10 + CALIBRATE):
            if device.type == "cuda":
                torch.cuda.synchronize()  # the steps queued so far are done, so the clock times them
            if step == 10:
                t_cal = time.perf_counter()
            else:
                rate = CALIBRATE / (time.perf_counter() - t_cal)  # steps/s; evaluations and saves take the 5% left
                steps = max(step + 1, int(step + rate * (args.minutes * 60 - (time.perf_counter() - t_start)) * 0.95))
                log.write(json.dumps({"step": step, "steps": steps, "steps_per_s": round(rate, 3)}) + "\n")
                print(json.dumps({"steps": steps, "steps_per_s": round(rate, 3)}), flush=True)
        ids = batch_at(train_tokens, step, args.seed, args.batch, args.seq).to(device)
        for group in optim.param_groups:  # (until --steps auto is fixed the schedule is in warm-up: length unused)
            group["lr"] = lr_at(step, WARMUP * 10 if steps == "auto" else steps, args.lr)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = model(ids[:, :-1], use_cache=False)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if out.aux_loss is not None:  # the routers' load balance
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss.float()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        step += 1
        if step % args.log_every == 0 or step == steps:
            now = time.perf_counter()
            result = {"step": step, "loss": round(loss.item(), 4), "lr": optim.param_groups[0]["lr"],
                      "tokens_per_s": round((step - t_step) * args.batch * args.seq / (now - t_last))}
            if step % args.eval_every == 0:
                result["heldout_loss"] = evaluate()
                checkpoint()
            log.write(json.dumps(result) + "\n")
            log.flush()
            print(json.dumps(result), flush=True)
            t_last, t_step = time.perf_counter(), step
    if steps == "auto":
        raise SystemExit("--steps auto: the run ended before its rate was measured; give --minutes more time")
    result = {"step": step, "steps": steps, "heldout_loss": evaluate(), "best_heldout_loss": best}
    checkpoint()
    log.write(json.dumps(result) + "\n")
    log.close()
    print(json.dumps(result), flush=True)
    if args.export:
        kept = torch.load(best_path, map_location=device, weights_only=True)
        model.load_state_dict(kept["model"])
        export(model, tok, args.export, {"step": kept["step"], "steps": steps, "heldout_loss": kept["heldout_loss"],
                                         "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
                                         "preset": args.preset})
    return result


def export(model, tok, where: Path, training: dict) -> None:
    """A Hugging Face checkpoint (bf16 safetensors, the tokenizer and its chat template) for `flashmoe convert`, and
    training.json: how it was trained (the model card's provenance)."""
    model.to(torch.bfloat16).save_pretrained(str(where), safe_serialization=True)
    tok.save_pretrained(str(where))
    (Path(where) / "training.json").write_text(json.dumps(training, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="corpus.py's folder (train.txt, heldout.txt)")
    ap.add_argument("--out", type=Path, required=True, help="tokenizer, tokens, checkpoint and log go here")
    ap.add_argument("--preset", choices=list(PRESETS), default="small")
    ap.add_argument("--steps", type=lambda v: v if v == "auto" else int(v), default=3000,
                    help="the schedule's length over all runs, or auto: as many as the first run's --minutes allow")
    ap.add_argument("--minutes", type=float, default=9.0, help="this run's budget; the checkpoint is saved at its end")
    ap.add_argument("--run-steps", type=int, default=None, help="at most this many steps in this run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--experts", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"],
                    help="transformers' experts implementation (grouped_mm: one grouped GEMM per projection)")
    ap.add_argument("--export", type=Path, default=None, help="also write a Hugging Face checkpoint here")
    train(ap.parse_args(argv))


if __name__ == "__main__":
    main()
