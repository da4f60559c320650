#!/usr/bin/env python3
"""Outputs of the real Gemma 3 270M GGUF (Q4_K_M) under llama.cpp and transformers, for
tests/fixtures/gemma3-270m/ (issue 28: "greedy tokens match llama.cpp ... and transformers").

    .venv-ref/bin/pip install llama-cpp-python gguf sentencepiece   # builds llama.cpp (minutes)
    GEMMA3_GGUF=/path/gemma-3-270m-q4_k_m.gguf .venv-ref/bin/python scripts/gen_gemma3_fixtures.py

Default GEMMA3_GGUF: /work/models/gemma-3-270m-q4_k_m.gguf (without the file nothing is written).
Writes:
  greedy_llamacpp.json       llama-cpp-python, n_ctx 512, greedy (argmax) 16 new tokens, 5 prompts,
                             prompt ids as llama.cpp's create_completion makes them (BOS, specials parsed)
  greedy_transformers.json   transformers loading the GGUF (dequantized to f32, eager attention),
                             greedy 16 tokens from the same prompt ids
  first_logits.safetensors   transformers' (and llama.cpp's) last-prompt-position logits for prompts 0
                             and 2: top-64 ids and values and the logsumexp of the full row
  tokens.json                llama.cpp's and transformers' tokenization of a few strings
Same conventions as scripts/gen_llama_fixtures.py (seeded where relevant, float32, eager attention,
one `fixture_info` metadata key in the .safetensors).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import llama_cpp
import gguf
from safetensors.torch import save_file

GENERATOR = "scripts/gen_gemma3_fixtures.py"
ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "gemma3-270m"
GGUF_PATH = Path(os.environ.get("GEMMA3_GGUF", "/work/models/gemma-3-270m-q4_k_m.gguf"))
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _pkg_version(name):
    from importlib.metadata import version

    return version(name)


VERSIONS = {
    "llama_cpp_python": llama_cpp.__version__,
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "gguf": _pkg_version("gguf"),
    "numpy": np.__version__,
    "python": sys.version.split()[0],
}

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "Once upon a time",
    "The word 'pronunciation' in ARPABET is",
]
LOGIT_PROMPTS = [0, 2]
NEW_TOKENS = 16
TOP = 64
N_CTX = 512
THREADS = 2
TOKEN_STRINGS = [
    "Hello, world!",
    "The word 'pronunciation' in ARPABET is",
    " spaces  and\ttabs\n",
    "12345 3.14",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "naïve café 東京 🙂",
]


def write_json(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print("wrote", path.relative_to(ROOT))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_llamacpp():
    llm = llama_cpp.Llama(
        model_path=str(GGUF_PATH), n_ctx=N_CTX, n_batch=N_CTX, n_threads=THREADS, logits_all=False, verbose=False
    )
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n_vocab = llm.n_vocab()
    eog = sorted(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()

    entries, logits_rows = [], {}
    for i, p in enumerate(PROMPTS):
        # What create_completion does with a text prompt: BOS (the file's add_bos_token is true),
        # then tokenize(prompt, add_bos=False, special=True).
        ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        new_ids, first = [], None
        for step in range(NEW_TOKENS):
            row = last_logits()
            if step == 0:
                first = row
            tok = int(np.argmax(row))
            new_ids.append(tok)
            if tok in eog:
                break
            llm.eval([tok])
        top = np.argsort(-first, kind="stable")[:5]
        entries.append(
            {
                "prompt": p,
                "input_ids": ids,
                "new_ids": new_ids,
                "new_text": llm.detokenize(new_ids).decode("utf-8", errors="replace"),
                "stopped_at_eog": new_ids[-1] in eog,
                "first_step_top5": [[int(j), float(first[j])] for j in top],
            }
        )
        if i in LOGIT_PROMPTS:
            logits_rows[i] = torch.from_numpy(first)
        print(f"  llama.cpp {p!r} -> {entries[-1]['new_text']!r}")

    toks = []
    for s in TOKEN_STRINGS:
        toks.append(
            {
                "text": s,
                "llamacpp_add_bos_special": llm.tokenize(s.encode("utf-8"), add_bos=True, special=True),
                "llamacpp_no_bos_no_special": llm.tokenize(s.encode("utf-8"), add_bos=False, special=False),
            }
        )
    info = {
        "n_vocab": n_vocab,
        "eog_ids": eog,
        "eog_texts": [llm._model.token_get_text(t) for t in eog],
        "bos": llm.token_bos(),
        "eos": llm.token_eos(),
        "add_bos_token": llm._model.add_bos_token(),
    }
    del llm
    return entries, logits_rows, toks, info


def main():
    if not GGUF_PATH.exists():
        print(f"{GGUF_PATH} not found (set GEMMA3_GGUF); nothing written")
        return
    torch.manual_seed(0)
    FIX.mkdir(parents=True, exist_ok=True)
    digest = sha256(GGUF_PATH)
    assert digest == EXPECTED_SHA256, f"{GGUF_PATH}: sha256 {digest}, expected {EXPECTED_SHA256}"
    reader = gguf.GGUFReader(str(GGUF_PATH))
    has_template = "tokenizer.chat_template" in reader.fields
    types = sorted({t.tensor_type.name for t in reader.tensors})
    del reader
    model_desc = {
        "file": GGUF_PATH.name,
        "sha256": digest,
        "tensor_types": types,
        "gguf_has_chat_template": has_template,
    }

    print("[llama.cpp]")
    cpp_entries, cpp_logits, cpp_toks, cpp_info = run_llamacpp()
    write_json(
        {
            "generator": GENERATOR,
            "versions": VERSIONS,
            "model": model_desc,
            "generation": f"llama-cpp-python Llama(n_ctx={N_CTX}, n_batch={N_CTX}, n_threads={THREADS}, "
            "logits_all=False, other settings default: f16 KV cache, CPU); eval(prompt ids), then greedy: argmax "
            f"of the last position's logits, {NEW_TOKENS} new tokens, stopping after an end-of-generation id",
            "prompt_ids": "llm.tokenize(prompt, add_bos=True, special=True): what create_completion does with a "
            "text prompt (BOS because the GGUF's tokenizer.ggml.add_bos_token is true; <start_of_turn> etc. are "
            "parsed as special tokens)",
            "vocab": cpp_info,
            "first_step_top5": "[token id, logit] of the last prompt position, highest first",
            "prompts": cpp_entries,
        },
        FIX / "greedy_llamacpp.json",
    )

    print("[transformers]")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = str(GGUF_PATH.parent), GGUF_PATH.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    eog = cpp_info["eog_ids"]
    hf_entries, hf_logits = [], {}
    for i, ce in enumerate(cpp_entries):
        ids = torch.tensor([ce["input_ids"]], dtype=torch.int64)
        with torch.no_grad():
            step = model(input_ids=ids).logits[0, -1].float()
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=eog,
                pad_token_id=tok.pad_token_id,
            )
        new_ids = out[0, ids.shape[1]:].tolist()
        assert new_ids[0] == int(torch.argmax(step)), "generate's first token != argmax of the forward pass"
        top = torch.topk(step, 5)
        hf_ids = tok(ce["prompt"])["input_ids"]
        hf_entries.append(
            {
                "prompt": ce["prompt"],
                "input_ids": ce["input_ids"],
                "transformers_tokenizer_ids": hf_ids,
                "transformers_tokenizer_agrees": hf_ids == ce["input_ids"],
                "new_ids": new_ids,
                "new_text": tok.decode(new_ids),
                "stopped_at_eog": len(new_ids) > 0 and new_ids[-1] in eog,
                "first_step_top5": [[int(j), float(v)] for v, j in zip(top.values, top.indices)],
                "agrees_with_llamacpp_for": first_diff(new_ids, ce["new_ids"]),
            }
        )
        if i in LOGIT_PROMPTS:
            hf_logits[i] = step.clone()
        print(f"  transformers {ce['prompt']!r} -> {tok.decode(new_ids)!r} "
              f"(agrees with llama.cpp for {hf_entries[-1]['agrees_with_llamacpp_for']} tokens)")
    cfg = model.config
    write_json(
        {
            "generator": GENERATOR,
            "versions": VERSIONS,
            "model": {
                **model_desc,
                "loaded_with": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32, "
                "attn_implementation='eager'): every tensor dequantized to f32 (gguf-py), norms stored +1 in the "
                "GGUF are shifted back by transformers' Gemma2TensorProcessor",
                "config": {
                    "layer_types": cfg.layer_types,
                    "sliding_window": cfg.sliding_window,
                    "rope_parameters": cfg.rope_parameters,
                    "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
                    "head_dim": cfg.head_dim,
                    "num_attention_heads": cfg.num_attention_heads,
                    "num_key_value_heads": cfg.num_key_value_heads,
                    "hidden_size": cfg.hidden_size,
                    "intermediate_size": cfg.intermediate_size,
                    "num_hidden_layers": cfg.num_hidden_layers,
                    "vocab_size": cfg.vocab_size,
                    "rms_norm_eps": cfg.rms_norm_eps,
                    "tie_word_embeddings": cfg.tie_word_embeddings,
                },
            },
            "generation": f"model.generate(do_sample=False, max_new_tokens={NEW_TOKENS}, eos_token_id={eog}) "
            "from the llama.cpp prompt ids of greedy_llamacpp.json (f32 activations throughout)",
            "prompts": hf_entries,
        },
        FIX / "greedy_transformers.json",
    )

    tensors = {}
    for i in LOGIT_PROMPTS:
        for src, row in (("", hf_logits[i]), ("llamacpp_", cpp_logits[i])):
            top = torch.topk(row, TOP)
            tensors[f"prompt{i}_{src}top_ids"] = top.indices.to(torch.int64)
            tensors[f"prompt{i}_{src}top_values"] = top.values.float()
            tensors[f"prompt{i}_{src}logsumexp"] = torch.logsumexp(row.double(), 0).float().reshape(1)
        tensors[f"prompt{i}_input_ids"] = torch.tensor(cpp_entries[i]["input_ids"], dtype=torch.int64)
    info = {
        "generator": GENERATOR,
        "versions": VERSIONS,
        "model": model_desc,
        "prompts": {str(i): PROMPTS[i] for i in LOGIT_PROMPTS},
        "layout": f"for prompt i in {LOGIT_PROMPTS}: prompt{{i}}_input_ids (llama.cpp's ids, BOS first); "
        f"prompt{{i}}_top_ids int64 [{TOP}] / prompt{{i}}_top_values f32 [{TOP}]: the {TOP} largest logits of "
        "the last prompt position under transformers (f32, dequantized), highest first; prompt{i}_logsumexp "
        "f32 [1]: logsumexp over the full 262144-entry row (computed in f64), so log-probs = value - "
        "logsumexp; the same three with `llamacpp_` for llama.cpp (its CPU products quantize activations "
        "to 8 bits)",
        "max_abs_diff_top_values_transformers_vs_llamacpp": {
            str(i): float((hf_logits[i][tensors[f"prompt{i}_top_ids"]] - cpp_logits[i][tensors[f"prompt{i}_top_ids"]])
                          .abs().max()) for i in LOGIT_PROMPTS
        },
    }
    path = FIX / "first_logits.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"fixture_info": json.dumps(info, sort_keys=True)})
    print("wrote", path.relative_to(ROOT))

    for e in cpp_toks:
        e["transformers_default"] = tok(e["text"])["input_ids"]
        e["transformers_no_special"] = tok(e["text"], add_special_tokens=False)["input_ids"]
        e["tokens"] = tok.convert_ids_to_tokens(e["llamacpp_add_bos_special"])
        e["agree_with_bos"] = e["transformers_default"] == e["llamacpp_add_bos_special"]
    write_json(
        {
            "generator": GENERATOR,
            "versions": VERSIONS,
            "model": model_desc,
            "llamacpp": "llm.tokenize(text, add_bos=True, special=True) and (add_bos=False, special=False)",
            "transformers": "AutoTokenizer.from_pretrained(dir, gguf_file=name) (GemmaTokenizer built from the "
            "GGUF metadata): tok(text) (adds <bos>) and tok(text, add_special_tokens=False)",
            "special_tokens": {
                "bos": [tok.bos_token, tok.bos_token_id],
                "eos": [tok.eos_token, tok.eos_token_id],
                "pad": [tok.pad_token, tok.pad_token_id],
                "unk": [tok.unk_token, tok.unk_token_id],
                "start_of_turn": tok.convert_tokens_to_ids("<start_of_turn>"),
                "end_of_turn": tok.convert_tokens_to_ids("<end_of_turn>"),
            },
            "strings": cpp_toks,
        },
        FIX / "tokens.json",
    )


if __name__ == "__main__":
    main()
