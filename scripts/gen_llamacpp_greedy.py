"""Greedy tokens of llama.cpp on SmolLM2-135M-Instruct's GGUF file, for the prompts of
tests/fixtures/smollm2/greedy.json (which holds transformers' tokens on the dequantized model).

llama.cpp rounds the activations to 8 bits per block of 32 in its CPU products by quantized
weights; `deltatune generate` does the same by default (`int8_activations`). The test
`smollm2_greedy_tokens_equal_transformers` checks our tokens with f32 activations against
transformers and with 8-bit activations against this file.

    .venv-ref/bin/pip install llama-cpp-python      # builds llama.cpp (several minutes)
    .venv-ref/bin/python scripts/gen_llamacpp_greedy.py \
        --gguf ~/.cache/deltatune/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ref = json.loads((FIXTURE / "greedy.json").read_text())
    llm = llama_cpp.Llama(
        model_path=a.gguf,
        n_threads=a.threads,
        n_ctx=256,
        logits_all=True,
        verbose=False,
    )
    eos = ref["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    entries = []
    for p in ref["prompts"]:
        llm.reset()
        llm.eval(list(p["input_ids"]))
        new_ids = []
        for _ in range(len(p["new_ids"])):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new_ids.append(tok)
            if tok in eos:
                break
            llm.eval([tok])
        same = next(
            (i for i, (x, y) in enumerate(zip(new_ids, p["new_ids"])) if x != y),
            min(len(new_ids), len(p["new_ids"])),
        )
        entries.append(
            {
                "prompt": p["prompt"],
                "input_ids": p["input_ids"],
                "new_ids": new_ids,
                "agrees_with_transformers_for": same,
            }
        )
        print(f"  {p['prompt']!r}: llama.cpp agrees with transformers for {same} tokens")
    out = {
        "generator": "scripts/gen_llamacpp_greedy.py",
        "versions": {
            "llama_cpp_python": llama_cpp.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "model": os.path.basename(a.gguf),
        "generation": "greedy (argmax of each step's logits), stops after an eos id; "
        f"{a.threads} threads, the prompts and token budgets of greedy.json",
        "prompts": entries,
    }
    path = FIXTURE / "greedy_llamacpp.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
