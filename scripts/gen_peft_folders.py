#!/usr/bin/env python3
"""Generate tests/fixtures/peft-folders/: adapter folders exactly as PEFT's `save_pretrained`
writes them for sequence classification (adapter_config.json + adapter_model.safetensors, no
run_config.json or labels.json), and PEFT's class probabilities on a few texts, the reference
for `deltatune predict --adapter <PEFT folder>`.

Run with the reference venv:

    bash scripts/setup_ref_venv.sh && .venv-ref/bin/python scripts/gen_peft_folders.py

The base is the tiny BERT of tests/fixtures/tiny-bert, saved again under base/ with its own
labels (id2label negative / neutral / positive, so a loader that reads the base's labels is
checked). Each adapter's trainable tensors are randomised (seeded) so it changes the output:

  lora             LoRA r 4 on query, value (suffix list); head in modules_to_save
  lora-regex       target_modules a regex string
  lora-all-linear  target_modules "all-linear"
  lora-rslora      rsLoRA
  lora-layers      layers_to_transform [1]
  lora-patterns    rank_pattern {"value": 2}, alpha_pattern {"layer.1.attention.self.query": 2}
  ia3              IA3 on key, value, output.dense (feed-forward)
  prompt           prompt tuning, 4 virtual tokens (PEFT saves the head as base_model.classifier.*)
  lora-bias-all    LoRA with bias "all": every bias of the model trains and is saved (targeted
                   layers' as <layer>.base_layer.bias, the norms' as ...LayerNorm.bias, and the
                   head's bias again as classifier.modules_to_save.bias and
                   classifier.original_module.bias)
  lora-bias-lora-only  LoRA with bias "lora_only": the targeted layers' biases
                   (<layer>.base_layer.bias)
  prefix           prefix tuning, 8 virtual tokens (PEFT 0.22 on transformers 5.25; PEFT 0.21
                   refused it on transformers 5's BERT, "Model does not support past key
                   values"). transformers' BERT takes the prefix as a past cache, so the tokens'
                   position ids start at 8.

expected.json: {folder: [[p0, p1, p2] per text]} with the texts in "texts"; each text is run
alone (no padding), softmax of PEFT's logits. "versions" are those every folder was made with,
"versions_of" those of a folder made later alone.

With folder names as arguments (`gen_peft_folders.py prefix lora-bias-all`), only those folders
are made again and their entries of expected.json replaced; the base and the other folders stay
as they are.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import peft
import transformers
from peft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig,
                  TaskType, get_peft_model)
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert"
OUT = ROOT / "tests" / "fixtures" / "peft-folders"
BASE = OUT / "base"
TEXTS = ["a good movie", "the plot is bad", "it is what it is and more"]
LABELS = ["negative", "neutral", "positive"]


def load_base():
    m = BertForSequenceClassification.from_pretrained(str(BASE), attn_implementation="eager",
                                                      dtype=torch.float32)
    m.eval()
    return m


def make_base():
    BASE.mkdir(parents=True)
    m = BertForSequenceClassification.from_pretrained(str(TINY), attn_implementation="eager",
                                                      dtype=torch.float32)
    m.config.id2label = dict(enumerate(LABELS))
    m.config.label2id = {l: i for i, l in enumerate(LABELS)}
    m.save_pretrained(str(BASE), safe_serialization=True)
    for f in BASE.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    shutil.copy(TINY / "tokenizer.json", BASE / "tokenizer.json")


def randomise(pm, seed):
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if "ia3_" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            n += 1
    assert n > 0


def probs(pm, tok):
    out = []
    for t in TEXTS:
        ids = tok.encode(t).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = pm(input_ids=x, attention_mask=torch.ones_like(x),
                        token_type_ids=torch.zeros_like(x)).logits
        out.append(torch.softmax(logits.float(), -1)[0].tolist())
    return out


def main():
    only = sys.argv[1:]
    if not (TINY / "model.safetensors").exists():
        sys.exit(f"{TINY} is missing: run scripts/gen_fixtures.py first")
    if only:
        if not (OUT / "expected.json").exists():
            sys.exit(f"{OUT} is missing: run without arguments first")
    else:
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        make_base()
    tok = Tokenizer.from_file(str(BASE / "tokenizer.json"))
    tok.no_padding()
    seq = TaskType.SEQ_CLS
    folders = {
        "lora": LoraConfig(task_type=seq, r=4, lora_alpha=8, target_modules=["query", "value"]),
        "lora-regex": LoraConfig(task_type=seq, r=4, lora_alpha=8,
                                 target_modules=r".*attention\.self\.(query|key)"),
        "lora-all-linear": LoraConfig(task_type=seq, r=2, lora_alpha=4,
                                      target_modules="all-linear"),
        "lora-rslora": LoraConfig(task_type=seq, r=4, lora_alpha=8, use_rslora=True,
                                  target_modules=["query", "value"]),
        "lora-layers": LoraConfig(task_type=seq, r=4, lora_alpha=8, layers_to_transform=[1],
                                  target_modules=["query", "value"]),
        "lora-patterns": LoraConfig(task_type=seq, r=4, lora_alpha=8,
                                    target_modules=["query", "value"],
                                    rank_pattern={"value": 2},
                                    alpha_pattern={"layer.1.attention.self.query": 2}),
        "ia3": IA3Config(task_type=seq, target_modules=["key", "value", "output.dense"],
                         feedforward_modules=["output.dense"]),
        "prompt": PromptTuningConfig(task_type=seq, num_virtual_tokens=4),
        "lora-bias-all": LoraConfig(task_type=seq, r=4, lora_alpha=8,
                                    target_modules=["query", "value"], bias="all"),
        "lora-bias-lora-only": LoraConfig(task_type=seq, r=4, lora_alpha=8,
                                          target_modules=["query", "value"], bias="lora_only"),
        "prefix": PrefixTuningConfig(task_type=seq, num_virtual_tokens=8),
    }
    unknown = [n for n in only if n not in folders]
    if unknown:
        sys.exit(f"unknown folders {unknown}; known: {list(folders)}")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    if only:
        expected = json.loads((OUT / "expected.json").read_text())
    else:
        expected = {"texts": TEXTS, "labels": LABELS}
    for i, (name, cfg) in enumerate(folders.items()):
        if only and name not in only:
            continue
        torch.manual_seed(100 + i)
        pm = get_peft_model(load_base(), cfg)
        randomise(pm, 200 + i)
        pm.peft_config["default"].base_model_name_or_path = "tests/fixtures/peft-folders/base"
        d = OUT / name
        if d.exists():
            shutil.rmtree(d)
        pm.save_pretrained(str(d), safe_serialization=True)
        (d / "README.md").unlink(missing_ok=True)
        cfg_path = d / "adapter_config.json"
        j = json.loads(cfg_path.read_text())
        for k in ("target_modules", "feedforward_modules", "modules_to_save"):
            if isinstance(j.get(k), list):
                j[k] = sorted(j[k])
        cfg_path.write_text(json.dumps(j, indent=2) + "\n")
        re = PeftModel.from_pretrained(load_base(), str(d))
        re.eval()
        expected[name] = probs(re, tok)
        base_p = probs(load_base(), tok)
        moved = max(abs(a - b) for r1, r2 in zip(expected[name], base_p) for a, b in zip(r1, r2))
        assert moved > 1e-3, f"{name}: the adapter does not change the output ({moved})"
        print(f"  {name}: {sorted(p.name for p in d.iterdir())}", file=sys.stderr)
        if only:
            expected.setdefault("versions_of", {})[name] = versions
    if not only:
        expected["versions"] = versions
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
