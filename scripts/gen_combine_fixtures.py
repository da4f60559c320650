#!/usr/bin/env python3
"""Generate tests/fixtures/tiny-llama-combine/: PEFT's `add_weighted_adapter` on LoRA adapters
of the tiny Llama (tests/fixtures/tiny-llama), the reference for `deltatune merge --adapters`.

Run with the reference venv (after scripts/gen_llama_fixtures.py has written tiny-llama):

    bash scripts/setup_ref_venv.sh && .venv-ref/bin/python scripts/gen_combine_fixtures.py

Sources (PEFT folders, `save_pretrained`), LoRA A from PEFT's default init after a seed, B
randn * 0.1 from a seeded generator:
  a/  r 4, alpha 12, q_proj v_proj down_proj
  b/  r 4, alpha 8,  q_proj v_proj            (no down_proj: combinations skip it there)
  c/  r 4, alpha 16, q_proj v_proj down_proj, rsLoRA (scaling alpha / sqrt(r))
  d/  r 2, alpha 4,  q_proj v_proj            (another rank: `cat` only)
  e/  r 4, alpha 8,  q_proj v_proj down_proj, rank_pattern {v_proj: 2,
      layers.1.self_attn.q_proj: 6}, alpha_pattern {down_proj: 3}

Cases (cases.json): adapters, weights, combination_type, density, majority_sign_method, and the
combined adapter's r, lora_alpha and target_modules as PEFT sets them. expected.safetensors holds
per case:
  `{case}/{key}`   the combined adapter's tensors under PEFT's saved key names
                   (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...)
  `source/{name}/logits`  each source adapter alone (PEFT's logits)
  `{case}/logits`  the tiny Llama's logits with the combined adapter active, on the inputs
                   `input_ids` / `attention_mask` (also in the file)
  `{case}/mask/{module}.lora_{A|B}.{adapter}`  ({module} as `model.layers.0.self_attn.q_proj`)
                   for the DARE cases: the Bernoulli keep-masks
                   PEFT drew (torch.bernoulli is recorded), so a test replays them exactly.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import peft
import transformers
from safetensors.torch import save_file
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-llama"
OUT = ROOT / "tests" / "fixtures" / "tiny-llama-combine"
GENERATOR = "scripts/gen_combine_fixtures.py"
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}

SOURCES = {
    "a": dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], seed=31),
    "b": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=32),
    "c": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], seed=33,
              use_rslora=True),
    "d": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], seed=34),
    "e": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=35,
              rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
              alpha_pattern={"down_proj": 3.0}),
}

CASES = [
    dict(name="linear", adapters=["a", "b", "c"], weights=[0.7, -0.3, 0.5], combination="linear"),
    dict(name="linear-single", adapters=["a"], weights=[0.5], combination="linear"),
    dict(name="cat", adapters=["a", "b", "d"], weights=[1.0, 0.5, -0.8], combination="cat"),
    dict(name="ties", adapters=["a", "b", "c"], weights=[0.7, -0.3, 0.5], combination="ties",
         density=0.5, majority_sign_method="total"),
    dict(name="ties-frequency", adapters=["a", "b", "c"], weights=[0.7, -0.3, 0.5],
         combination="ties", density=0.5, majority_sign_method="frequency"),
    dict(name="dare_linear", adapters=["a", "b", "c"], weights=[0.7, -0.3, 0.5],
         combination="dare_linear", density=0.6),
    dict(name="dare_ties", adapters=["a", "b", "c"], weights=[0.7, -0.3, 0.5],
         combination="dare_ties", density=0.6, majority_sign_method="total"),
    dict(name="cat-patterns", adapters=["a", "e"], weights=[0.5, 1.5], combination="cat"),
    dict(name="magnitude_prune", adapters=["a", "b", "c"], weights=[0.7, -0.3, 0.5],
         combination="magnitude_prune", density=0.4),
]


def load_llama():
    m = LlamaForCausalLM.from_pretrained(str(TINY), attn_implementation="eager", dtype=torch.float32)
    m.eval()
    return m


def inputs():
    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(3, 96, (2, 7), generator=g, dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_source(name, spec):
    d = OUT / name
    d.mkdir(parents=True)
    torch.manual_seed(spec["seed"])
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=spec["r"], lora_alpha=spec["lora_alpha"],
                     target_modules=spec["target_modules"], lora_dropout=0.0,
                     use_rslora=spec.get("use_rslora", False),
                     rank_pattern=spec.get("rank_pattern", {}),
                     alpha_pattern=spec.get("alpha_pattern", {}))
    pm = get_peft_model(load_llama(), cfg)
    g = torch.Generator().manual_seed(spec["seed"] + 100)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.peft_config["default"].base_model_name_or_path = "tests/fixtures/tiny-llama"
    pm.save_pretrained(str(d), safe_serialization=True)
    (d / "README.md").unlink(missing_ok=True)
    cfg_path = d / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    if isinstance(cfg_json.get("target_modules"), list):
        cfg_json["target_modules"] = sorted(cfg_json["target_modules"])
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")


class BernoulliRecorder:
    """Wraps torch.bernoulli: records every mask drawn, in call order."""

    def __init__(self):
        self.masks = []
        self.orig = torch.bernoulli

    def __enter__(self):
        def rec(*a, **k):
            m = self.orig(*a, **k)
            self.masks.append(m.clone())
            return m
        torch.bernoulli = rec
        return self

    def __exit__(self, *exc):
        torch.bernoulli = self.orig


def call_order(pm, case):
    """The (module, A|B, adapter) of each pruning call, in PEFT's order: modules as
    named_modules lists them; per module all A tensors (adapters in order, those that have the
    module), then all B tensors."""
    order = []
    for key, mod in pm.base_model.model.named_modules():
        if not hasattr(mod, "lora_A") or "combined" not in mod.lora_A:
            continue
        present = [a for a in case["adapters"] if a in mod.lora_A]
        for side in ("A", "B"):
            order += [(key, side, a) for a in present]
    return order


def main():
    if not (TINY / "model.safetensors").exists():
        sys.exit(f"{TINY} is missing: run scripts/gen_llama_fixtures.py first")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name, spec in SOURCES.items():
        make_source(name, spec)
    x = inputs()
    tensors = dict(x)
    for name in SOURCES:
        pm = PeftModel.from_pretrained(load_llama(), str(OUT / name))
        pm.eval()
        with torch.no_grad():
            tensors[f"source/{name}/logits"] = pm(**x).logits.float()
    cases_out = []
    for case in CASES:
        pm = PeftModel.from_pretrained(load_llama(), str(OUT / case["adapters"][0]),
                                       adapter_name=case["adapters"][0])
        for a in case["adapters"][1:]:
            pm.load_adapter(str(OUT / a), adapter_name=a)
        kw = {}
        if "density" in case:
            kw["density"] = case["density"]
        if "majority_sign_method" in case:
            kw["majority_sign_method"] = case["majority_sign_method"]
        torch.manual_seed(99)
        with BernoulliRecorder() as rec:
            pm.add_weighted_adapter(case["adapters"], case["weights"], "combined",
                                    combination_type=case["combination"], **kw)
        pm.set_adapter("combined")
        pm.eval()
        with torch.no_grad():
            logits = pm(**x).logits.float()
        state = peft.get_peft_model_state_dict(pm, adapter_name="combined")
        for k, v in state.items():
            tensors[f"{case['name']}/{k}"] = v
        tensors[f"{case['name']}/logits"] = logits
        if rec.masks:
            order = call_order(pm, case)
            assert len(order) == len(rec.masks), (len(order), len(rec.masks))
            for (module, side, a), m in zip(order, rec.masks):
                tensors[f"{case['name']}/mask/{module}.lora_{side}.{a}"] = m
        cfg = pm.peft_config["combined"]
        tm = cfg.target_modules
        cases_out.append({**case, "r": cfg.r, "lora_alpha": cfg.lora_alpha,
                          "target_modules": sorted(tm) if isinstance(tm, (set, list)) else tm,
                          "keys": sorted(state.keys())})
        print(f"  {case['name']}: {len(state)} tensors, r {cfg.r}, "
              f"{len(rec.masks)} masks", file=sys.stderr)
    info = {"generator": GENERATOR, "versions": VERSIONS}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()},
              str(OUT / "expected.safetensors"),
              metadata={"fixture_info": json.dumps(info, sort_keys=True)})
    (OUT / "cases.json").write_text(json.dumps(cases_out, indent=2) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
