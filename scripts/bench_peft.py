"""The PyTorch + PEFT side of `deltatune bench`: the same workload, timed the same way.

One LoRA training step (forward + backward + AdamW) and forward-only inference on
all-MiniLM-L6-v2 as BertForSequenceClassification, batch 16 x 128 random token ids, all-ones
mask, LoRA r=8 alpha=16 dropout=0.1 on query,value with the classifier trained, 2 threads, f32,
3 warm-up + N timed repetitions, median reported. Writes JSON that `deltatune bench --reference`
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


def train_step():
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def infer():
    with torch.inference_mode():
        model(**inputs).logits.sum().item()


def timed(fn):
    for _ in range(3):
        fn()
    ms = []
    for _ in range(args.steps):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


model.train()
result = {"train_f32": timed(train_step)}
model.eval()
result["infer_f32"] = timed(infer)
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["versions"] = {"torch": torch.__version__}
with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps(result, indent=1))
