"""Run llama.cpp's own convert_hf_to_gguf.py (the writer of the GGUF files people download) on a tiny checkpoint.
usage: python llama_convert.py LLAMA_CPP_DIR HF_DIR OUT.gguf OUTTYPE

Its one refusal on a tiny checkpoint: it recognises a BPE pre-tokenizer by hashing the real model's tokenizer, and the
tiny one is not a real model's; the tiny tokenizer splits text as Qwen2's does, so it is told 'qwen2'."""

import json
import os
import runpy
import sys

llama, hf, out, outtype = sys.argv[1:5]
sys.path[:0] = [llama, f"{llama}/gguf-py"]
from conversion import base  # noqa: E402  (llama.cpp's conversion package)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
model_type = json.load(open(os.path.join(hf, "config.json"))).get("model_type", "")
# the families with a multi-token-prediction head take --no-nextn (our tiny ones have none); the others refuse it
mtp = ["--no-nextn"] if model_type.startswith(("qwen3_5", "qwen3_next")) else []
sys.argv = [f"{llama}/convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", outtype, *mtp]
runpy.run_path(sys.argv[0], run_name="__main__")
