"""The PyTorch + PEFT side of `deltatune bench --task generate`'s training rows: the same workload,
timed the same way.

SmolLM2-135M-Instruct from its GGUF file (transformers dequantizes it to f32), LoRA r=8 alpha=16
dropout=0.05 on q_proj,v_proj, a batch of 16 sequences of 24 random token ids (10 prompt + 14
completion tokens; labels -100 on the prompt, so the loss is on the completion tokens), one
training step = forward + backward + AdamW, 2 threads, in f32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`, the two precisions taking turns step by step,
3 warm-up + N timed; median, min and max, and tokens/s (all 384 tokens of the batch per step).

Set-up (not part of CI): bash scripts/setup_ref_venv.sh
Run:    .venv-ref/bin/python scripts/bench_peft_decoder.py \\
            --gguf ~/.cache/deltatune/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
            --out peft-decoder.json
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.set_num_threads(2)
torch.manual_seed(0)
batch, prompt, completion = 16, 10, 14
path = os.path.expanduser(args.gguf)
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32)
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                         target_modules=["q_proj", "v_proj"]))
gen = torch.Generator().manual_seed(0)
ids = torch.randint(100, model.config.vocab_size, (batch, prompt + completion), generator=gen)
labels = ids.clone()
labels[:, :prompt] = -100
mask = torch.ones_like(ids)
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=1e-4)
model.train()


def step(bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


names = ["decoder_train_f32", "decoder_train_bf16"]
ms = {n: [] for n in names}
for i in range(3 + args.steps):
    for bf16, n in zip((False, True), names):
        t = time.perf_counter()
        step(bf16)
        if i >= 3:
            ms[n].append((time.perf_counter() - t) * 1e3)
tokens = batch * (prompt + completion)
result = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
              "tokens_per_s": tokens / (statistics.median(v) / 1e3)} for n, v in ms.items()}
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["versions"] = {"torch": torch.__version__}
with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps(result, indent=1))
