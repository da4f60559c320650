"""Greedy generation speed of llama.cpp (through llama-cpp-python, built from source by pip) on
the same GGUF file and workload as `deltatune bench --task generate`: a 16-token prompt, 64 new
tokens, batch 1 and batch 8 (eight sequences decoded together in one llama_batch), 2 threads.
Writes a JSON file that `deltatune bench --task generate --reference FILE` prints beside its
own rows.

    .venv-ref/bin/pip install llama-cpp-python      # builds llama.cpp (several minutes)
    .venv-ref/bin/python scripts/bench_llamacpp.py --gguf ~/.cache/deltatune/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf --out llamacpp.json
"""

import argparse
import ctypes
import json
import os
import statistics
import time

import llama_cpp
import numpy as np

PROMPTS = [
    "Write a long story about a dragon who learns to code.",
    "Explain how a bicycle works, step by step, for a child.",
    "List the planets of the solar system and describe each.",
    "Describe a busy market in a small town on a Saturday.",
    "What are the main causes of the seasons on Earth?",
    "Tell me about the history of the printing press.",
    "Give advice to someone starting to learn the piano.",
    "Describe the water cycle in simple words for a class.",
]


def prompt_tokens(llm, text, n=16):
    toks = llm.tokenize(text.encode(), add_bos=False, special=False)
    return (toks * 4)[:n]


def context(llm, threads):
    """A context of its own for up to 8 sequences (the high-level Llama makes one for 1)."""
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_seq_max = 2048, 512, 8
    p.n_threads, p.n_threads_batch = threads, threads
    return llama_cpp.llama_init_from_model(llm.model, p)


def generate_batch(llm, ctx, prompts, new_tokens):
    """Greedy decoding of len(prompts) sequences in one llama_batch per step; returns seconds
    and tokens generated."""
    n_vocab = llama_cpp.llama_n_vocab(llama_cpp.llama_model_get_vocab(llm.model))
    b = len(prompts)
    mem = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_clear(mem, True)
    batch = llama_cpp.llama_batch_init(max(sum(len(p) for p in prompts), b), 0, b)
    t0 = time.perf_counter()

    def add(tok, pos, seq, logits):
        i = batch.n_tokens
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
        batch.n_tokens = i + 1

    batch.n_tokens = 0
    last_index = []
    for s, p in enumerate(prompts):
        for j, tok in enumerate(p):
            add(tok, j, s, j == len(p) - 1)
        last_index.append(batch.n_tokens - 1)
    assert llama_cpp.llama_decode(ctx, batch) == 0
    pos = [len(p) for p in prompts]
    generated = 0
    for _ in range(new_tokens):
        nxt = []
        for s in range(b):
            logits = llama_cpp.llama_get_logits_ith(ctx, last_index[s])
            arr = (ctypes.c_float * n_vocab).from_address(ctypes.addressof(logits.contents))
            nxt.append(int(np.ctypeslib.as_array(arr).argmax()))
        batch.n_tokens = 0
        for s, tok in enumerate(nxt):
            add(tok, pos[s], s, True)
            last_index[s] = s
            pos[s] += 1
        generated += b
        assert llama_cpp.llama_decode(ctx, batch) == 0
    secs = time.perf_counter() - t0
    llama_cpp.llama_batch_free(batch)
    return secs, generated


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=512, n_threads=a.threads, verbose=False)
    ctx = context(llm, a.threads)
    rows = {}
    for b in (1, 8):
        prompts = [prompt_tokens(llm, p) for p in PROMPTS[:b]]
        generate_batch(llm, ctx, prompts, 4)  # warm-up
        per_token = []
        for _ in range(a.runs):
            secs, n = generate_batch(llm, ctx, prompts, a.new_tokens)
            per_token.append(secs * 1e3 / n)
        m = statistics.median(per_token)
        rows[f"batch{b}"] = {"ms_per_token": m, "min": min(per_token), "max": max(per_token),
                             "tokens_per_s": 1e3 / m, "runs": a.runs}
        print(f"llama.cpp batch {b}: {m:.2f} ms/token ({1e3 / m:.0f} tokens/s)")
    out = {"llama_cpp_python": llama_cpp.__version__, "threads": a.threads,
           "gguf": os.path.basename(a.gguf), "new_tokens": a.new_tokens, **rows}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
