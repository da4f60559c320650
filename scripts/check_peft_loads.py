"""Checks that Hugging Face PEFT loads an adapter folder written by `deltatune train` and
predicts what deltatune predicts.

Loads the base model named in the folder's run_config.json as BertForSequenceClassification,
applies the adapter with `PeftModel.from_pretrained`, and compares class probabilities on a few
texts with `deltatune predict --json`. Exits non-zero when they differ by more than 1e-4.

Run: .venv-ref/bin/python scripts/check_peft_loads.py runs/lora-rotten-tomatoes
"""
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

adapter = Path(sys.argv[1])
binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/deltatune"
texts = ["a gorgeous, witty film", "the plot is a mess and the acting is worse .",
         "an uneven but often moving portrait", "it's not bad", "dull , lifeless and far too long"]
run = json.loads((adapter / "run_config.json").read_text())
labels = json.loads((adapter / "labels.json").read_text())["labels"]
base = AutoModelForSequenceClassification.from_pretrained(run["model_dir"], num_labels=len(labels))
model = PeftModel.from_pretrained(base, str(adapter)).eval()
tok = AutoTokenizer.from_pretrained(run["model_dir"])
with torch.inference_mode():
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    peft_probs = torch.softmax(model(**enc).logits, -1)
out = subprocess.run([binary, "predict", "--adapter", str(adapter), "--json", *texts],
                     check=True, capture_output=True, text=True).stdout
ours = torch.tensor([json.loads(line)["probabilities"] for line in out.splitlines()])
diff = (ours - peft_probs).abs().max().item()
for t, p, q in zip(texts, peft_probs.tolist(), ours.tolist()):
    print(f"{t!r:50} PEFT {[round(x, 5) for x in p]}  deltatune {[round(x, 5) for x in q]}")
print(f"max |difference| of probabilities: {diff:.2e}")
sys.exit(0 if diff <= 1e-4 else 1)
