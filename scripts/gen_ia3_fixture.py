#!/usr/bin/env python3
"""Generate tests/fixtures/tiny-bert-ia3/: a PEFT (IA)^3 adapter on tiny-bert and its logits.

    .venv-ref/bin/python scripts/gen_ia3_fixture.py

IA3Config(task_type=SEQ_CLS, target_modules=["key", "value", "output.dense"],
feedforward_modules=["output.dense"]) -- PEFT's default for BERT. PEFT tests feed-forward
membership with a plain `str.endswith`, so `attention.output.dense` is feed-forward too (its
vector scales the input). After get_peft_model every ia3_l is overwritten with 1 + N(0, 0.3)
(seed 4) and N(0, 0.2) noise is added to the classifier copy, so that the adapter changes the
logits. Writes adapter_config.json (sorted keys and target lists), adapter_model.safetensors and
expected.safetensors (inputs, `logits` unmerged, `logits_merged` after merge_and_unload).
Seeded: re-running reproduces the files.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures as gf  # noqa: E402
from peft import IA3Config, PeftModel, get_peft_model  # noqa: E402

OUT = gf.FIX / "tiny-bert-ia3"


def main():
    torch.use_deterministic_algorithms(True)
    inputs = gf.tiny_inputs()
    with torch.no_grad():
        base_logits = gf.load_tiny()(**inputs).logits.float()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    cfg = IA3Config(
        task_type="SEQ_CLS",
        target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
    )
    pm = get_peft_model(gf.load_tiny(), cfg)
    g = torch.Generator().manual_seed(4)
    n_l = n_cls = 0
    shapes = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
                shapes[name] = list(p.shape)
                n_l += 1
            elif "modules_to_save" in name and "classifier" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
                n_cls += 1
    assert n_l == 8 and n_cls == 2, (n_l, n_cls)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    pm.peft_config["default"].base_model_name_or_path = "tests/fixtures/tiny-bert"
    pm.eval()
    with torch.no_grad():
        logits = pm(**inputs).logits.float()

    pm.save_pretrained(str(OUT), safe_serialization=True)
    (OUT / "README.md").unlink(missing_ok=True)
    cfg_path = OUT / "adapter_config.json"
    cj = json.loads(cfg_path.read_text())
    for k in ("target_modules", "feedforward_modules"):
        if isinstance(cj.get(k), list):
            cj[k] = sorted(cj[k])
    cfg_path.write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")

    re_pm = PeftModel.from_pretrained(gf.load_tiny(), str(OUT))
    re_pm.eval()
    with torch.no_grad():
        logits_reload = re_pm(**inputs).logits.float()
    assert torch.allclose(logits, logits_reload, atol=1e-6)
    merged = re_pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        logits_merged = merged(**inputs).logits.float()
    d_merge = (logits - logits_merged).abs().max().item()
    d_base = (logits - base_logits).abs().max().item()
    assert d_merge < 1e-5, d_merge
    assert d_base > 1e-2, d_base

    info = {
        "generator": "scripts/gen_ia3_fixture.py",
        "versions": gf.VERSIONS,
        "trainable_params": trainable,
    }
    exp = {**inputs, "logits": logits, "logits_merged": logits_merged}
    exp = {k: v.detach().contiguous().cpu() for k, v in exp.items()}
    save_file(exp, str(OUT / "expected.safetensors"), metadata={"fixture_info": json.dumps(info, sort_keys=True)})

    with safe_open(str(OUT / "adapter_model.safetensors"), framework="pt") as f:
        for k in sorted(f.keys()):
            print(f"  {k} {f.get_slice(k).get_shape()}")
    print(f"trainable params {trainable}; |unmerged-merged| {d_merge:.3e}; |ia3-base| {d_base:.3e}")


if __name__ == "__main__":
    main()
