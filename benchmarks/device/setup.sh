# Sourced at the start of a device command (see make_carry.sh): the carried wheels into /tmp/site, the trimmed
# transformers first on the path, then the GPU's name and memory.
# (whichever of the wheel folders the call carried: the 64 MiB limit can leave one behind)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls scratch/whl-fla/*.whl scratch/whl-sm/*.whl 2>/dev/null) 2>&1 | tail -2
export PYTHONPATH=$PWD/scratch/tfslim:/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
