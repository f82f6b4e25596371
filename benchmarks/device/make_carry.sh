#!/usr/bin/env bash
# Build what a device call carries (the device has no network; its image lacks fla-core, the server's packages and a
# transformers new enough for flashmoe.tiny), into scratch/ (git-ignored: add `/scratch/` to .git/info/exclude):
#   scratch/tfslim   transformers of this venv, trimmed to the families flashmoe.tiny builds (~8 MB)
#   scratch/whl-fla  fla-core (DeltaNet's Triton kernels)
#   scratch/whl-sm   the server and its load generator: fastapi (<0.142: no opentelemetry), uvicorn, pydantic,
#                    openai and what they need beyond the image (~7 MB; xgrammar left out: only grammar tests need it)
# The tracked tree is ~46 MB of the 64 MiB a call carries: these three fit beside it, the llama.cpp tarball does not.
# Use: benchmarks/device/make_carry.sh; then run(command="source benchmarks/device/setup.sh; ...",
#      carry=["scratch/tfslim", "scratch/whl-fla", "scratch/whl-sm"]).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=${PYTHON:-python3}
site=$($py -c "import transformers, os; print(os.path.dirname(os.path.dirname(transformers.__file__)))")
rm -rf scratch/tfslim scratch/whl-fla scratch/whl-sm
mkdir -p scratch/tfslim scratch/whl-fla scratch/whl-sm
cp -r "$site/transformers" scratch/tfslim/
keep=" auto encoder_decoder qwen3_next qwen3_5_moe qwen3_5 qwen3_moe qwen3 qwen2 qwen2_moe mixtral mistral glm4_moe glm4 \
deepseek_v3 gpt_oss minimax_m2 llama __init__.py "
for d in scratch/tfslim/transformers/models/*; do
    case "$keep" in *" $(basename "$d") "*) ;; *) rm -rf "$d";; esac
done
(cd scratch/tfslim/transformers && rm -rf pipelines exporters cli trainer.py trainer_*.py testing_utils.py \
    training_args*.py data)
find scratch/tfslim -name __pycache__ -prune -exec rm -rf {} +
plat="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$py -m pip download -q $plat -d scratch/whl-fla fla-core
for pkg in "fastapi<0.142" starlette pydantic pydantic_core uvicorn annotated-types typing-inspection annotated-doc \
           prompt_toolkit wcwidth openai httpx2 httpcore2 truststore jiter sniffio; do
    $py -m pip download -q $plat -d scratch/whl-sm "$pkg"
done
du -sh scratch/tfslim scratch/whl-fla scratch/whl-sm
