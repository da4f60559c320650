"""Writes N LoRA adapter folders in PEFT's layout (adapter_config.json +
adapter_model.safetensors) for the default decoder (SmolLM2-135M-Instruct: q_proj, v_proj of
30 layers) or the default encoder (all-MiniLM-L6-v2: query, value of 6 layers, plus a trained
2-class head), with random weights: the load of `scripts/serve_bench.sh` (a LoRA adapter's cost
in the server depends on its shapes, not its values).

Needs numpy and safetensors (the reference venv: bash scripts/setup_ref_venv.sh).

    .venv-ref/bin/python scripts/make_serve_adapters.py --kind decoder --n 8 --out /tmp/dec
"""

import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file

KINDS = {
    # hidden, layers, {target: (out, in)}, module path of layer i, task, head rows
    "decoder": dict(
        layers=30,
        targets={"q_proj": (576, 576), "v_proj": (192, 576)},
        path="base_model.model.model.layers.{i}.self_attn.{t}",
        task="CAUSAL_LM",
        head=None,
        hidden=576,
    ),
    "encoder": dict(
        layers=6,
        targets={"query": (384, 384), "value": (384, 384)},
        path="base_model.model.bert.encoder.layer.{i}.attention.self.{t}",
        task="SEQ_CLS",
        head=2,
        hidden=384,
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=sorted(KINDS), required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=None, help="base_model_name_or_path to record")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    k = KINDS[a.kind]
    rng = np.random.default_rng(a.seed)
    for n in range(a.n):
        d = os.path.join(a.out, f"a{n}")
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for i in range(k["layers"]):
            for t, (o, inp) in k["targets"].items():
                p = k["path"].format(i=i, t=t)
                tensors[f"{p}.lora_A.weight"] = (
                    rng.standard_normal((a.r, inp)) / np.sqrt(inp)
                ).astype(np.float32)
                tensors[f"{p}.lora_B.weight"] = (
                    rng.standard_normal((o, a.r)) * 0.02
                ).astype(np.float32)
        if k["head"]:
            tensors["base_model.model.classifier.weight"] = (
                rng.standard_normal((k["head"], k["hidden"])) * 0.02
            ).astype(np.float32)
            tensors["base_model.model.classifier.bias"] = np.zeros(k["head"], np.float32)
        cfg = {
            "peft_type": "LORA",
            "task_type": k["task"],
            "r": a.r,
            "lora_alpha": 2 * a.r,
            "lora_dropout": 0.0,
            "target_modules": sorted(k["targets"]),
            "modules_to_save": ["classifier"] if k["head"] else None,
            "base_model_name_or_path": a.base
            or ("SmolLM2-135M-Instruct" if a.kind == "decoder" else "all-MiniLM-L6-v2"),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    print(f"{a.n} {a.kind} adapters in {a.out}")


if __name__ == "__main__":
    main()
