"""The PyTorch + PEFT side of `deltatune bench`: the same workload, timed the same way.

One LoRA training step (forward + backward + AdamW) and forward-only inference on
all-MiniLM-L6-v2 as BertForSequenceClassification, batch 16 x 128 random token ids, all-ones
mask, LoRA r=8 alpha=16 dropout=0.1 on query,value with the classifier trained, 2 threads, in f32
and under `torch.autocast("cpu", dtype=torch.bfloat16)` (what deltatune's `train.bf16` matches:
linear layers in bf16, the rest f32), 3 warm-up + N timed repetitions, the two precisions taking
turns step by step; median, min and max reported. Writes JSON that `deltatune bench --reference`
prints beside its own numbers.

Set-up (not part of CI): bash scripts/setup_ref_venv.sh
Run:    .venv-ref/bin/python scripts/bench_peft.py --model ~/.cache/deltatune/models/all-MiniLM-L6-v2 --out peft.json
"""
import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.set_num_threads(2)
torch.manual_seed(0)
batch, seq = 16, 128
model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                         lora_dropout=0.1, target_modules=["query", "value"]))
gen = torch.Generator().manual_seed(0)
inputs = dict(input_ids=torch.randint(1000, model.config.vocab_size, (batch, seq), generator=gen),
              attention_mask=torch.ones(batch, seq, dtype=torch.long),
              token_type_ids=torch.zeros(batch, seq, dtype=torch.long))
labels = torch.randint(0, 2, (batch,), generator=gen)
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=5e-4)


def train_step(bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def infer(bf16):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(**inputs).logits.float().sum().item()


def timed(fn, names):
    """Runs fn(False) (f32) and fn(True) (bf16) in turns; returns their timings by name."""
    ms = {n: [] for n in names}
    for i in range(3 + args.steps):
        for bf16, n in zip((False, True), names):
            t = time.perf_counter()
            fn(bf16)
            if i >= 3:
                ms[n].append((time.perf_counter() - t) * 1e3)
    return {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
            for n, v in ms.items()}


model.train()
result = timed(train_step, ["train_f32", "train_bf16"])
model.eval()
result.update(timed(infer, ["infer_f32", "infer_bf16"]))
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["versions"] = {"torch": torch.__version__}
with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps(result, indent=1))
