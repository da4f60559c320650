"""Checks that Hugging Face PEFT loads an adapter folder written by `deltatune train` and
predicts what deltatune predicts.

Loads the base model named in the folder's run_config.json as BertForSequenceClassification,
applies the adapter with `PeftModel.from_pretrained`, and compares class probabilities on a few
texts (one padded batch, as `deltatune predict` runs them) with `deltatune predict --json`.
Exits non-zero when they differ by more than 1e-5, or when PEFT reports adapter keys it did not
load (a tensor PEFT skips is a silent difference).

Any method PEFT has: LoRA (with `bias` none, all or lora_only), IA3, prompt and prefix tuning.
Prefix tuning: transformers' BERT takes PEFT's prefix as a past cache and starts the tokens'
position ids after it; deltatune's BERT does the same.

Run: .venv-ref/bin/python scripts/check_peft_loads.py runs/lora-rotten-tomatoes [BINARY]
"""
import json
import subprocess
import sys
from pathlib import Path

import warnings

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification

adapter = Path(sys.argv[1])
binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/deltatune"
texts = ["a gorgeous, witty film", "the plot is a mess and the acting is worse .",
         "an uneven but often moving portrait", "it's not bad", "dull , lifeless and far too long"]
run = json.loads((adapter / "run_config.json").read_text())
labels = json.loads((adapter / "labels.json").read_text())["labels"]
model_dir = Path(run["model_dir"])
base = AutoModelForSequenceClassification.from_pretrained(
    str(model_dir), num_labels=len(labels), ignore_mismatched_sizes=True,
    attn_implementation="eager", dtype=torch.float32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
skipped = [str(w.message) for w in caught if "unexpected adapter keys" in str(w.message)]
if skipped:
    print("PEFT did not load every tensor:", *skipped, sep="\n  ")
    sys.exit(1)
# The tokenizer.json of the base, as deltatune reads it: padded to the longest, at most 128.
pad_id = json.loads((model_dir / "config.json").read_text()).get("pad_token_id") or 0
tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
tok.enable_truncation(max_length=128)
tok.enable_padding(pad_id=pad_id)
encs = tok.encode_batch(texts)
with torch.inference_mode():
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    peft_probs = torch.softmax(logits, -1)
out = subprocess.run([binary, "predict", "--adapter", str(adapter), "--json", *texts],
                     check=True, capture_output=True, text=True).stdout
ours = torch.tensor([json.loads(line)["probabilities"] for line in out.splitlines()])
diff = (ours - peft_probs).abs().max().item()
for t, p, q in zip(texts, peft_probs.tolist(), ours.tolist()):
    print(f"{t!r:50} PEFT {[round(x, 5) for x in p]}  deltatune {[round(x, 5) for x in q]}")
print(f"max |difference| of probabilities: {diff:.2e}")
sys.exit(0 if diff <= 1e-5 else 1)
