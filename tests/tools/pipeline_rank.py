"""One rank of a torch.distributed run (launched by torchrun from test_placement.py): the store loaded as this rank's
block of layers; what it computed is written to OUT/rank<r>.pt."""

import sys

import torch

import flashmoe

store, out = sys.argv[1], sys.argv[2]
prompt = [int(t) for t in sys.argv[3].split(",")]
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
model = flashmoe.load(store, device=device, distributed=True, cache_gb=0.01, dtype=torch.float32)
state = model.new_state()
steps = torch.cat([model.forward(prompt[:5], state)] + [model.forward([t], state) for t in prompt[5:]])
result = {
    "logits": model.logits(prompt).cpu(),
    "steps": steps.cpu(),
    "greedy": list(model.generate(prompt[:8], 10, stop_token_ids=[])),
    "sampled": list(model.generate(prompt[:8], 10, temperature=1.0, stop_token_ids=[])),  # no seed: one shared
    "layers": [list(s.layers) for s in model.stages],
    "held": sorted({int(n.split(".")[2]) for n in model.model.w if n.startswith("model.layers.")}),
    "expert_reads": model.stats["expert_reads"],
    "device": str(model.device),
}
torch.save(result, f"{out}/rank{model.pipeline.rank}.pt")
model.close()
