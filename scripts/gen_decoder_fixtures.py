#!/usr/bin/env python3
"""Reference fixtures for the general decoder (issue 28): one tiny random checkpoint per family,
its GGUF written by llama.cpp's own converter, PEFT LoRA adapters, and PEFT SEQ_CLS adapters.

    .venv-ref/bin/python scripts/gen_decoder_fixtures.py [family ...]

Families: llama, llama-linear, mistral, qwen2, qwen3, gemma2, gemma3, phi3 (default: all), then
the `<family>-lora` adapters and `qwen2-seqcls-lora` / `llama-seqcls-lora`.

    .venv-ref/bin/python scripts/gen_decoder_fixtures.py --ours [family ...]

writes `<family>-ours/` for the seven LoRA families instead: a LoRA adapter that deltatune trained
(`target/release/deltatune train --task generate --model tests/fixtures/decoders/<family>/model.gguf
--set lora.target_modules="all-linear"`, two epochs on a 32-line spelling set) loaded by PEFT
(`PeftModel.from_pretrained` on transformers' model of the family folder; every tensor of the
file is checked to be PEFT's parameter) and PEFT's logits on the base fixture's inputs.

Conventions of scripts/gen_llama_fixtures.py: everything seeded, model.eval(),
attn_implementation="eager", float32, and every `expected.safetensors` has one metadata key
`fixture_info` (JSON: generator, versions, the family's quirks and their values, notes).

Writes tests/fixtures/decoders/<family>/:
  config.json, model.safetensors     transformers save_pretrained (f32)
  tokenizer files                    a tiny tokenizer of the family's kind (the converter needs one)
  model.gguf                         llama.cpp's convert_hf_to_gguf.py --outtype f32 on that folder
  gguf_layout.json                   every GGUF metadata key (token arrays abridged), every tensor
                                     (name, GGUF type, ne), and checks of how the converter stored
                                     the HF tensors (q/k permuted for rope?, norm weights +1?)
  expected.safetensors               input_ids/attention_mask [2, 12] (row 1 right-padded to 8,
                                     pad id 0) and transformers' logits [2, 12, 128]; where the GGUF
                                     cannot carry a quirk (see `gguf_differs` in fixture_info),
                                     also `logits_gguf`: transformers with the config llama.cpp reads
                                     from the GGUF; and `logits_llamacpp_row{0,1}`: llama.cpp
                                     (llama-cpp-python, f32 KV cache) on model.gguf, each row alone.

llama.cpp's converter: LLAMA_CPP_DIR=<a llama.cpp source tree> (with convert_hf_to_gguf.py,
conversion/ and gguf-py/), or else the script fetches the llama-cpp-python sdist of the installed
llama_cpp version with `pip download --no-deps --no-binary :all:` into
$DELTATUNE_LLAMA_CPP_SRC (default /tmp/deltatune-llama-cpp-src) and uses its vendor/llama.cpp.
(`--no-binary llama-cpp-python`, not `:all:`, which would also build cmake from source for the
sdist's build backend.)
"""

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy
import torch
import transformers
import peft
import safetensors
import tokenizers
import sentencepiece
import gguf
import llama_cpp
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

GENERATOR = "scripts/gen_decoder_fixtures.py"
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "decoders"


def _pkg_version(name):
    from importlib.metadata import version

    return version(name)


VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "safetensors": safetensors.__version__,
    "tokenizers": tokenizers.__version__,
    "sentencepiece": sentencepiece.__version__,
    "numpy": numpy.__version__,
    "gguf (installed, used to read)": _pkg_version("gguf"),
    "llama_cpp_python": llama_cpp.__version__,
    "python": sys.version.split()[0],
}

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
INTER = 96
LAYERS = 2
SEQ_LEN = 12
ROW_LENGTHS = [12, 8]
PAD_ID = 0

WRITTEN = []


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def rel(p: Path) -> str:
    return str(Path(p).resolve().relative_to(ROOT))


def note(path: Path):
    WRITTEN.append(Path(path))


def save_tensors(tensors: dict, path: Path, info: dict):
    full = {"generator": GENERATOR, "versions": VERSIONS}
    full.update(info)
    # One metadata key only (safetensors keeps metadata in a hash map: several keys would make the
    # bytes depend on the process).
    meta = {"fixture_info": json.dumps(full, sort_keys=True)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    note(path)


def write_json(obj, path: Path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    note(path)


def list_keys(path: Path):
    with safe_open(str(path), framework="pt") as f:
        return [(k, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in sorted(f.keys())]


def fresh_dir(d: Path):
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def tiny_inputs():
    g = torch.Generator().manual_seed(1234)
    # ids 3.. : never the pad id 0 (transformers' sequence classification pools the last id != pad)
    input_ids = torch.randint(3, VOCAB, (len(ROW_LENGTHS), SEQ_LEN), generator=g, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for i, n in enumerate(ROW_LENGTHS):
        attention_mask[i, :n] = 1
        input_ids[i, n:] = PAD_ID
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------
# tiny tokenizers (the converter needs one; llama.cpp needs a newline token for BPE vocabs)
# --------------------------------------------------------------------------------------
CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "the cat sat on the mat; the dog sat on the log.",
    "She said: 'I've been there, it's fine.' He didn't agree.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and 12345 or 3.14.",
    "pronunciation of words in ARPABET: HH AH0 L OW1\n",
    "Hello world! Hello there? (yes) [no] {maybe} <tag> #hash @at $5 %7 ^ & * - _ = + | \\ / ~ `",
    "a quick brown fox jumps over the lazy dog\n\nthen it rests.",
] * 4

# Pre-tokenizer regexes of the real tokenizers (tokenizer.json of Llama 3 and Qwen2).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_KINDS = {
    # llama.cpp tokenizer.ggml.pre, split regex, special tokens (ids 0, 1, 2), bos, eos, pad
    "llama-bpe": ("llama-bpe", LLAMA3_SPLIT, ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"],
                  "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"),
    "qwen2": ("qwen2", QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              None, "<|im_end|>", "<|endoftext|>"),
}


def write_bpe_tokenizer(d: Path, kind: str):
    """Byte-level BPE trained on CORPUS to exactly VOCAB ids, with the family's split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pre, split, specials, bos, eos, pad = BPE_KINDS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, show_progress=False, min_frequency=1
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert "Ċ" in tok.get_vocab(), "llama.cpp needs a newline token in a BPE vocab"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, clean_up_tokenization_spaces=False
    )
    fast.save_pretrained(str(d))
    return {"kind": "gpt2 byte-level BPE (tokenizers BpeTrainer on a fixed corpus)", "tokenizer.ggml.pre": pre,
            "special_tokens": {s: i for i, s in enumerate(specials)}, "bos": bos, "eos": eos, "pad": pad}


SP_KINDS = {
    # gemma: <pad>=0 <eos>=1 <bos>=2 <unk>=3, no dummy prefix (Gemma's add_space_prefix false)
    "gemma": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False),
    # llama/mistral/phi3 SentencePiece: <unk>=0 <s>=1 </s>=2, dummy prefix, no pad piece
    "llama": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True),
}


def write_sp_tokenizer(d: Path, kind: str, added: list | None = None):
    """SentencePiece BPE model trained on CORPUS (no byte fallback: that alone would need 256 byte
    pieces). `added` tokens take the last ids, after the SentencePiece pieces, in added_tokens.json
    (as Phi-3 ships <|endoftext|> and its chat tokens), so pieces + added = VOCAB."""
    import sentencepiece as spm

    added = added or []
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=VOCAB - len(added),
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=False,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        shuffle_input_sentence=False,
        hard_vocab_limit=True,
        minloglevel=2,
        **SP_KINDS[kind],
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert sp.get_piece_size() == VOCAB - len(added), sp.get_piece_size()
    info = {"kind": f"SentencePiece BPE ({kind} special-token order), no byte fallback, trained on a fixed corpus",
            "tokenizer.ggml.pre": "default", **{k: v for k, v in SP_KINDS[kind].items()}}
    if added:
        ids = {t: VOCAB - len(added) + i for i, t in enumerate(added)}
        (d / "added_tokens.json").write_text(json.dumps(ids, indent=2) + "\n")
        info["added_tokens"] = ids
    return info


# --------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    initializer_range=0.02,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

FAMILIES = {
    "llama": dict(
        config_cls="LlamaConfig",
        config=dict(COMMON, head_dim=16, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                    hidden_act="silu", attention_bias=False, mlp_bias=False, rope_parameters=LLAMA3_ROPE),
        tokenizer=("bpe", "llama-bpe"),
        gemma_norm=False,
        quirks={
            "gqa": "4 query heads, 2 KV heads (head_dim 16)",
            "tie_word_embeddings": False,
            "rope": LLAMA3_ROPE,
        },
        ablations={"rope_default_same_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})},
    ),
    "llama-linear": dict(
        config_cls="LlamaConfig",
        config=dict(COMMON, head_dim=16, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                    hidden_act="silu", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        tokenizer=("bpe", "llama-bpe"),
        gemma_norm=False,
        quirks={
            "gqa": "4 query heads, 2 KV heads (head_dim 16)",
            "tie_word_embeddings": False,
            "rope": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        },
        ablations={"rope_default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})},
    ),
    "mistral": dict(
        config_cls="MistralConfig",
        config=dict(COMMON, head_dim=16, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                    hidden_act="silu", sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        tokenizer=("sp", "llama"),
        gemma_norm=False,
        quirks={
            "gqa": "4 query heads, 2 KV heads (head_dim 16)",
            "sliding_window": "4 on every layer: query i sees keys j with 0 <= i - j < 4 (transformers "
            "sliding_window_overlay: kv_idx > q_idx - sliding_window)",
            "tie_word_embeddings": False,
        },
        ablations={"no_sliding_window": dict(sliding_window=None)},
        # llama.cpp's converter maps MistralForCausalLM to LlamaModel: arch `llama`, and writes no window.
        gguf_overrides=dict(sliding_window=None),
        gguf_differs="convert_hf_to_gguf.py converts MistralForCausalLM with its LlamaModel class: "
        "general.architecture `llama`, q/k permuted, and NO sliding-window key, so llama.cpp attends to "
        "all previous tokens. `logits_gguf` = transformers with sliding_window=None (same weights).",
    ),
    "qwen2": dict(
        config_cls="Qwen2Config",
        config=dict(COMMON, tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, hidden_act="silu",
                    use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        tokenizer=("bpe", "qwen2"),
        gemma_norm=False,
        quirks={
            "gqa": "4 query heads, 2 KV heads (head_dim 16)",
            "qkv_bias": "q_proj, k_proj, v_proj have biases (o_proj none), randomized N(0, 0.2^2)",
            "tie_word_embeddings": True,
            "rope_theta": 1000000.0,
        },
        ablations={},
    ),
    "qwen3": dict(
        config_cls="Qwen3Config",
        config=dict(COMMON, head_dim=24, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2,
                    hidden_act="silu", attention_bias=False, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        tokenizer=("bpe", "qwen2"),
        gemma_norm=False,
        quirks={
            "gqa": "4 query heads, 2 KV heads",
            "head_dim": "24, explicit, != hidden/heads = 16: q_proj [96, 64], k_proj/v_proj [48, 64], o_proj [64, 96]",
            "qk_norm": "q_norm/k_norm RMSNorm over head_dim (24), weight 1 + 0.2*randn, applied per head "
            "before rope",
            "tie_word_embeddings": False,
        },
        ablations={},
    ),
    "gemma2": dict(
        config_cls="Gemma2Config",
        config=dict(COMMON, head_dim=16, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        tokenizer=("sp", "gemma"),
        gemma_norm=True,
        quirks={
            "gqa": "4 query heads, 2 KV heads (head_dim 16)",
            "attn_logit_softcapping": "5.0: scores = 5*tanh(scores/5) after scaling, before the mask",
            "final_logit_softcapping": "3.0: logits = 3*tanh(logits/3)",
            "sliding_window": "4 on layer 0 (layer_types [sliding_attention, full_attention])",
            "query_pre_attn_scalar": "24 (head_dim 16): scores scaled by 24^-0.5",
            "activation": "GeGLU, gelu_pytorch_tanh: down(gelu_tanh(gate(x)) * up(x))",
            "embedding_scale": "embeddings * sqrt(64) = 8 (in the weight dtype)",
            "norms": "Gemma RMSNorm x*(1+w), w = 0.2*randn: input_layernorm, post_attention_layernorm, "
            "pre_feedforward_layernorm, post_feedforward_layernorm, final norm",
            "tie_word_embeddings": True,
        },
        ablations={
            "no_attn_softcap": dict(attn_logit_softcapping=None),
            "no_final_softcap": dict(final_logit_softcapping=None),
            "query_pre_attn_scalar_16": dict(query_pre_attn_scalar=16),
            "no_sliding_window": dict(layer_types=["full_attention", "full_attention"]),
        },
        gguf_overrides=dict(query_pre_attn_scalar=16),
        gguf_differs="GGUF has no key for query_pre_attn_scalar: llama.cpp (src/models/gemma2.cpp) scales "
        "by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) only for the 46-layer 27B). `logits_gguf` = "
        "transformers with query_pre_attn_scalar=16 (=head_dim), same weights.",
    ),
    "gemma3": dict(
        config_cls="Gemma3TextConfig",
        config=dict(COMMON, head_dim=16, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
        tokenizer=("sp", "gemma"),
        gemma_norm=True,
        quirks={
            "gqa": "4 query heads, 2 KV heads (head_dim 16)",
            "layer_types": "[sliding_attention, full_attention]: layer 0 local (window 4, rope theta 10000), "
            "layer 1 global (no window, rope theta 1e6)",
            "sliding_window": 4,
            "rope": "local (sliding) layers theta 10000, global layers theta 1000000 (transformers 5 "
            "rope_parameters per layer type; transformers 4 called them rope_local_base_freq / rope_theta)",
            "qk_norm": "q_norm/k_norm Gemma RMSNorm x*(1+w) over head_dim (16), w = 0.2*randn, before rope",
            "query_pre_attn_scalar": "24 (head_dim 16): scores scaled by 24^-0.5",
            "activation": "GeGLU, gelu_pytorch_tanh",
            "embedding_scale": "embeddings * sqrt(64) = 8",
            "norms": "Gemma RMSNorm x*(1+w), w = 0.2*randn, pre and post norms around attention and MLP",
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "tie_word_embeddings": True,
        },
        ablations={
            "query_pre_attn_scalar_16": dict(query_pre_attn_scalar=16),
            "all_global": dict(layer_types=["full_attention", "full_attention"]),
            "same_rope_theta_1e6": dict(rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
        },
        gguf_overrides=dict(query_pre_attn_scalar=16, layer_types=["sliding_attention", "sliding_attention"]),
        gguf_differs="The converter writes gemma3.attention.sliding_window (4) and gemma3.rope.freq_base_swa "
        "(10000) but no sliding_window_pattern and no query_pre_attn_scalar. llama.cpp (src/models/gemma3.cpp) "
        "then uses its default pattern 6 (layer il is local iff il % 6 < 5), so BOTH layers of this 2-layer "
        "model are local (window 4, theta 10000), and scales by 1/sqrt(head_dim). `logits_gguf` = transformers "
        "with layer_types [sliding, sliding] and query_pre_attn_scalar=16, same weights. (Real Gemma 3 files "
        "have 18/26/34/48/62 layers, where pattern 6 is what transformers does too.)",
    ),
    "phi3": dict(
        config_cls="Phi3Config",
        config=dict(COMMON, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
                    sliding_window=None, original_max_position_embeddings=256,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        tokenizer=("sp", "llama", ["<|endoftext|>"]),
        gemma_norm=False,
        quirks={
            "gqa": "4 query heads, 2 KV heads (head_dim 16)",
            "fused_qkv": "self_attn.qkv_proj [q 64 | k 32 | v 32 rows = 128, 64]",
            "fused_gate_up": "mlp.gate_up_proj [gate 96 | up 96 rows = 192, 64]: down(silu(gate) * up)",
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
        ablations={},
    ),
}


def llama3_rope_report(rope: dict, head_dim: int) -> dict:
    """Which frequencies Llama 3 scaling changes (the same rule as transformers'
    _compute_llama3_parameters and the converter's rope_freqs tensor)."""
    base, factor = rope["rope_theta"], rope["factor"]
    old = rope["original_max_position_embeddings"]
    low_wl, high_wl = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    rows = []
    for i in range(head_dim // 2):
        inv = base ** (-2 * i / head_dim)
        wl = 2 * math.pi / inv
        if wl < high_wl:
            div, kind = 1.0, "unchanged (wavelength < original/high_freq_factor)"
        elif wl > low_wl:
            div, kind = factor, "divided by factor (wavelength > original/low_freq_factor)"
        else:
            smooth = (old / wl - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            div, kind = 1.0 / ((1 - smooth) / factor + smooth), f"smoothed (smooth = {smooth:.6f})"
        rows.append({"i": i, "inv_freq": inv, "wavelength": wl, "divisor": div, "scaled_inv_freq": inv / div,
                     "kind": kind})
    return {"thresholds": {"high_freq_wavelen": high_wl, "low_freq_wavelen": low_wl}, "frequencies": rows}


def make_config(fam: dict, overrides: dict | None = None):
    cls = getattr(transformers, fam["config_cls"])
    kw = dict(fam["config"])
    if overrides:
        kw.update(overrides)
    return cls(**kw)


def randomize(model, seed: int, gemma_norm: bool):
    """Every parameter gets a new random value: 2-d weights N(0, 0.15^2) (embeddings N(0, 0.25^2)),
    biases N(0, 0.2^2), norm weights 1 + 0.2*randn (Gemma's (1 + w) norms: 0.2*randn)."""
    g = torch.Generator().manual_seed(seed)
    kinds = {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                z = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(z if gemma_norm else 1.0 + z)
                kinds[name] = "norm"
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                kinds[name] = "bias"
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
                kinds[name] = "embedding"
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
                kinds[name] = "linear"
            else:
                raise AssertionError(f"unexpected parameter {name} {tuple(p.shape)}")
    return kinds


def load_causal(path: Path, **overrides):
    model = AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32, **overrides
    )
    model.eval()
    return model


# --------------------------------------------------------------------------------------
# llama.cpp converter
# --------------------------------------------------------------------------------------
def llama_cpp_dir() -> Path:
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        d = Path(env)
    else:
        cache = Path(os.environ.get("DELTATUNE_LLAMA_CPP_SRC", "/tmp/deltatune-llama-cpp-src"))
        ver = llama_cpp.__version__
        d = cache / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
        if not d.exists():
            cache.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                 f"llama-cpp-python=={ver}", "-d", str(cache)],
                check=True,
            )
            sdists = sorted(cache.glob(f"llama_cpp_python-{ver}.tar.gz"))
            assert sdists, f"no sdist of llama-cpp-python {ver} in {cache}"
            with tarfile.open(sdists[0]) as tf:
                tf.extractall(cache, filter="data")
    if not (d / "convert_hf_to_gguf.py").exists():
        raise SystemExit(f"{d} has no convert_hf_to_gguf.py: set LLAMA_CPP_DIR to a llama.cpp source tree")
    return d


# Runs llama.cpp's own converter (convert_hf_to_gguf.main) in a child process. The only change: for
# a GPT-2 BPE vocabulary, get_vocab_base_pre (which recognises a tokenizer by hashing its ids on a
# fixed text, and refuses unknown ones) returns the pre-tokenizer name the tiny tokenizer was built
# to imitate (its split regex is the real one), since a 128-token vocabulary has no known hash.
CONVERT_BOOT = r"""
import sys
llama_dir, pre, model_dir, outfile = sys.argv[1:5]
sys.path.insert(0, llama_dir)
import convert_hf_to_gguf
if pre:
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", outfile]
convert_hf_to_gguf.main()
"""


def convert_to_gguf(model_dir: Path, pre: str | None) -> Path:
    out = model_dir / "model.gguf"
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py bundled with the converter
    env["PYTHONHASHSEED"] = "0"
    r = subprocess.run(
        [sys.executable, "-c", CONVERT_BOOT, str(llama_cpp_dir()), pre or "", str(model_dir), str(out)],
        env=env, capture_output=True, text=True,
    )
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"convert_hf_to_gguf.py failed on {model_dir}")
    note(out)
    return out


def field_value(f):
    try:
        v = f.contents()
    except Exception:  # pragma: no cover
        return "<unreadable>"
    return v


def gguf_layout(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    keys = []
    for k, f in r.fields.items():
        v = field_value(f)
        entry = {"key": k, "type": "/".join(t.name for t in f.types)}
        if isinstance(v, list) and len(v) > 8:
            entry["len"] = len(v)
            entry["first"] = v[:4]
            entry["last"] = v[-2:]
        elif isinstance(v, str) and len(v) > 300:
            entry["len"] = len(v)
            entry["value"] = v[:300] + "..."
        else:
            entry["value"] = v
        keys.append(entry)
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "ne": [int(x) for x in t.shape],
         "numpy_shape": list(t.data.shape)}
        for t in r.tensors
    ]
    return {"keys": keys, "tensors": tensors}


def gguf_tensors(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(numpy.array(t.data)) for t in r.tensors}


def permute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def storage_checks(model_dir: Path, gguf_path: Path, fam: dict) -> dict:
    """How the HF tensors ended up in the GGUF (exact comparisons)."""
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    gg = gguf_tensors(gguf_path)
    out = {}
    cfg = fam["config"]
    hd = cfg.get("head_dim") or HIDDEN // HEADS
    if "model.layers.0.self_attn.q_proj.weight" in hf:
        q, k = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
        gq, gk = gg["blk.0.attn_q.weight"], gg["blk.0.attn_k.weight"]
        if torch.equal(gq, q) and torch.equal(gk, k):
            out["q_k_rows"] = "stored as in HF (not permuted; llama.cpp uses NEOX / rotate-half rope for this arch)"
        elif torch.equal(gq, permute_for_llama_cpp(q, HEADS)) and torch.equal(gk, permute_for_llama_cpp(k, KV_HEADS)):
            out["q_k_rows"] = ("permuted for llama.cpp's interleaved (NORM) rope: GGUF = "
                               "W.reshape(n, 2, rows/n/2, in).swapaxes(1, 2).reshape(rows, in) with n = heads (q) "
                               "or kv heads (k); undo with W.reshape(n, rows/n/2, 2, in).swapaxes(1, 2)")
        else:
            out["q_k_rows"] = "neither equal nor llama-permuted (?)"
        for b in ("q_proj", "k_proj", "v_proj"):
            key = f"model.layers.0.self_attn.{b}.bias"
            if key in hf:
                gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}[b]
                out[f"{b}.bias"] = "equal" if torch.equal(gg[f"blk.0.{gname}.bias"], hf[key]) else "differs"
    if "model.layers.0.self_attn.qkv_proj.weight" in hf:
        out["qkv_proj"] = ("stored fused as blk.N.attn_qkv.weight, equal to HF"
                           if torch.equal(gg["blk.0.attn_qkv.weight"], hf["model.layers.0.self_attn.qkv_proj.weight"])
                           else "attn_qkv differs from HF qkv_proj")
        out["gate_up_proj"] = ("stored fused as blk.N.ffn_up.weight [gate rows then up rows], equal to HF"
                               if torch.equal(gg["blk.0.ffn_up.weight"], hf["model.layers.0.mlp.gate_up_proj.weight"])
                               else "ffn_up differs from HF gate_up_proj")
    norm = hf["model.norm.weight"]
    gnorm = gg["output_norm.weight"]
    if torch.equal(gnorm, norm):
        out["norm_weights"] = "stored as in HF"
    elif torch.allclose(gnorm, norm + 1.0, atol=0, rtol=0) or torch.equal(gnorm, norm + 1.0):
        out["norm_weights"] = ("stored as HF + 1 (the converter adds 1 to every *norm.weight, incl. q/k norms), "
                               "so llama.cpp multiplies by the stored weight; subtract 1 to get HF's w")
    else:
        out["norm_weights"] = f"differs (max {maxdiff(gnorm, norm)})"
    out["has_output.weight"] = "output.weight" in gg
    out["has_rope_freqs.weight"] = "rope_freqs.weight" in gg
    if "rope_freqs.weight" in gg:
        out["rope_freqs.weight"] = [float(x) for x in gg["rope_freqs.weight"]]
    emb = hf["model.embed_tokens.weight"]
    out["token_embd_equal"] = torch.equal(gg["token_embd.weight"], emb)
    # Every HF tensor -> the GGUF tensor holding it, found by value (the weights are random, so a
    # match is unambiguous), with how it is stored.
    heads = {"q_proj": HEADS, "k_proj": KV_HEADS}
    mapping = {}
    for hname, ht in sorted(hf.items()):
        found = []
        for gname, gt in gg.items():
            if gt.shape != ht.shape:
                continue
            if torch.equal(gt, ht):
                found.append((gname, "as is"))
            elif torch.equal(gt, ht + 1.0):
                found.append((gname, "HF + 1"))
            else:
                proj = hname.split(".")[-2]
                if proj in heads and ht.dim() >= 1 and ht.shape[0] % (2 * heads[proj]) == 0:
                    if torch.equal(gt, permute_for_llama_cpp(ht, heads[proj])):
                        found.append((gname, f"llama.cpp rope permutation, n = {heads[proj]}"))
        assert len(found) == 1, (hname, found)
        mapping[hname] = {"gguf": found[0][0], "stored": found[0][1]}
    out["hf_to_gguf"] = mapping
    return out


# --------------------------------------------------------------------------------------
# llama.cpp reference run
# --------------------------------------------------------------------------------------
def llamacpp_logits(gguf_path: Path, inputs) -> list:
    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False,
        type_k=0, type_v=0, flash_attn=False,  # f32 KV cache (GGML_TYPE_F32 = 0)
    )
    rows = []
    for i, n in enumerate(ROW_LENGTHS):
        llm.reset()
        llm.eval(inputs["input_ids"][i, :n].tolist())
        rows.append(torch.tensor(numpy.array(llm.scores[:n]), dtype=torch.float32))
    del llm
    return rows


# --------------------------------------------------------------------------------------
# base fixtures
# --------------------------------------------------------------------------------------
def gen_family(name: str, seed: int, inputs):
    fam = FAMILIES[name]
    d = OUT / name
    fresh_dir(d)
    torch.manual_seed(seed)
    cfg = make_config(fam)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    kinds = randomize(model, seed=1000 + seed, gemma_norm=fam["gemma_norm"])
    model.save_pretrained(str(d), safe_serialization=True)
    for f in sorted(d.iterdir()):
        if f.name not in {"config.json", "model.safetensors"}:
            f.unlink()  # generation_config.json
    tkind, tname, *tadded = fam["tokenizer"]
    tok_info = write_bpe_tokenizer(d, tname) if tkind == "bpe" else write_sp_tokenizer(d, tname, *tadded)
    for f in sorted(d.iterdir()):
        note(f)

    model = load_causal(d)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    # Right padding must not change row 1's real positions.
    n1 = ROW_LENGTHS[1]
    with torch.no_grad():
        solo = model(input_ids=inputs["input_ids"][1:, :n1]).logits.float()
    d_pad = maxdiff(solo[0], logits[1, :n1])
    assert d_pad < 1e-5, d_pad

    # Every quirk must show in the logits: turn each off and measure.
    abl = {}
    for aname, over in fam.get("ablations", {}).items():
        m2 = load_causal(d, **over)
        with torch.no_grad():
            l2 = m2(**inputs).logits.float()
        abl[aname] = {"config_overrides": over, "max_abs_diff_vs_logits": maxdiff(l2, logits)}
        assert abl[aname]["max_abs_diff_vs_logits"] > 1e-3, (name, aname, abl[aname])

    # GGUF
    gpath = convert_to_gguf(d, tok_info["tokenizer.ggml.pre"] if tkind == "bpe" else None)
    layout = gguf_layout(gpath)
    checks = storage_checks(d, gpath, fam)

    tensors = {**inputs, "logits": logits}
    logits_gguf_ref = logits
    if fam.get("gguf_overrides"):
        mg = load_causal(d, **fam["gguf_overrides"])
        with torch.no_grad():
            logits_gguf = mg(**inputs).logits.float()
        tensors["logits_gguf"] = logits_gguf
        logits_gguf_ref = logits_gguf

    # llama.cpp on the GGUF, each row alone (its real tokens only)
    cpp_rows = llamacpp_logits(gpath, inputs)
    cpp_diff = []
    for i, n in enumerate(ROW_LENGTHS):
        tensors[f"logits_llamacpp_row{i}"] = cpp_rows[i]
        cpp_diff.append(maxdiff(cpp_rows[i], logits_gguf_ref[i, :n]))
    cpp_vs_hf = [maxdiff(cpp_rows[i], logits[i, :n]) for i, n in enumerate(ROW_LENGTHS)]
    print(f"  {name}: llama.cpp vs {'logits_gguf' if fam.get('gguf_overrides') else 'logits'} "
          f"max {max(cpp_diff):.2e}; vs logits {max(cpp_vs_hf):.2e}; ablations "
          + ", ".join(f"{k} {v['max_abs_diff_vs_logits']:.2f}" for k, v in abl.items()))
    # ggml's CPU GELU goes through an f16 lookup table (GGML_GELU_FP16 in ggml-cpu/vec.h), so GeGLU
    # families differ from transformers by ~1e-3 there; the others agree to ~1e-5.
    cpp_tol = 5e-3 if fam["gemma_norm"] else 1e-4
    assert max(cpp_diff) < cpp_tol, (name, cpp_diff)

    arch = next(e["value"] for e in layout["keys"] if e["key"] == "general.architecture")
    write_json(
        {
            "generator": GENERATOR,
            "family": name,
            "hf_architecture": type(model).__name__,
            "gguf_architecture": arch,
            "converter": "llama.cpp convert_hf_to_gguf.py --outtype f32 (from the llama-cpp-python "
            f"{llama_cpp.__version__} sdist, vendor/llama.cpp, with its bundled gguf-py)",
            "converter_patch": (f"get_vocab_base_pre returns {tok_info['tokenizer.ggml.pre']!r} (tiny vocab has no "
                                "known hash)") if tkind == "bpe" else None,
            "storage_checks": checks,
            "metadata": layout["keys"],
            "tensors": layout["tensors"],
        },
        d / "gguf_layout.json",
    )
    if fam["config"].get("rope_parameters", {}).get("rope_type") == "llama3":
        rep = llama3_rope_report(fam["config"]["rope_parameters"], fam["config"]["head_dim"])
        divs = [r["divisor"] for r in rep["frequencies"]]
        assert numpy.allclose(divs, checks["rope_freqs.weight"], rtol=1e-6), (divs, checks["rope_freqs.weight"])
        fam["quirks"]["rope_llama3_frequencies"] = rep
    info = {
        "family": name,
        "model": f"random {type(model).__name__}: torch.manual_seed({seed}), then every parameter redrawn "
        f"(generator seed {1000 + seed}): 2-d weights N(0, 0.15^2), embeddings N(0, 0.25^2), biases N(0, 0.2^2), "
        + ("Gemma (1+w) norm weights w = 0.2*randn" if fam["gemma_norm"] else "RMSNorm weights 1 + 0.2*randn"),
        "config": {k: v for k, v in fam["config"].items()},
        "quirks": fam["quirks"],
        "quirk_ablations": abl,
        "tokenizer": tok_info,
        "inputs": f"input_ids/attention_mask int64 [2, {SEQ_LEN}], ids random in 3..{VOCAB - 1} (generator seed "
        f"1234); row 1 right-padded after {ROW_LENGTHS[1]} tokens with id {PAD_ID}, mask 0; no position_ids "
        "passed (positions 0..11 in both rows)",
        "logits": f"transformers, float32, eager, [2, {SEQ_LEN}, {VOCAB}]; padded positions of row 1 have "
        "values too (masked keys get finfo.min); compare real positions",
        "max_abs_diff_row1_padded_vs_solo": d_pad,
        "gguf": "model.gguf, llama.cpp convert_hf_to_gguf.py --outtype f32; layout in gguf_layout.json",
        "gguf_architecture": arch,
        "gguf_differs": fam.get("gguf_differs"),
        "gguf_config_overrides": fam.get("gguf_overrides"),
        "logits_llamacpp": "logits_llamacpp_row{0,1}: llama-cpp-python on model.gguf, each row's real tokens "
        "alone, f32 KV cache, no flash attention, 2 threads",
        "max_abs_diff_llamacpp_vs_logits_gguf" if fam.get("gguf_overrides") else "max_abs_diff_llamacpp_vs_logits":
            cpp_diff,
        "max_abs_diff_llamacpp_vs_logits_per_row": cpp_vs_hf,
        "llamacpp_note": "llama.cpp's CPU GELU rounds its input to f16 for a table lookup (GGML_GELU_FP16), "
        "so on GeGLU families (gemma2, gemma3) it differs from transformers by up to a few 1e-3; the "
        "1e-4 reference is transformers (`logits`, or `logits_gguf` for the GGUF)" if fam["gemma_norm"] else
        "agrees with transformers to a few 1e-6",
        "parameter_kinds": sorted(set(kinds.values())),
    }
    save_tensors(tensors, d / "expected.safetensors", info)
    return logits


# --------------------------------------------------------------------------------------
# PEFT LoRA (CAUSAL_LM) per family
# --------------------------------------------------------------------------------------
LORA_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def save_adapter(pm, out_dir: Path, base_rel: str):
    pm.peft_config["default"].base_model_name_or_path = base_rel
    pm.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)
    cfg_path = out_dir / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    for k in ("target_modules", "modules_to_save"):
        if isinstance(cfg_json.get(k), list):
            cfg_json[k] = sorted(cfg_json[k])
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    for f in sorted(out_dir.iterdir()):
        note(f)
    return cfg_json


def adapter_keys(out_dir: Path):
    return {k: list(s) for k, _, s in list_keys(out_dir / "adapter_model.safetensors")}


def gen_lora(name: str, seed: int, inputs, base_logits):
    base_dir = OUT / name
    d = OUT / f"{name}-lora"
    fresh_dir(d)
    targets = LORA_TARGETS.get(name, DEFAULT_LORA_TARGETS)
    torch.manual_seed(2000 + seed)  # lora_A: PEFT's kaiming-uniform init from the global RNG
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    pm = get_peft_model(load_causal(base_dir), cfg)
    g = torch.Generator().manual_seed(3000 + seed)
    n_b = 0
    with torch.no_grad():
        for pname, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                n_b += 1
    assert n_b == LAYERS * len(targets), n_b
    pm.eval()
    with torch.no_grad():
        logits = pm(**inputs).logits.float()
    save_adapter(pm, d, rel(base_dir))
    re_pm = PeftModel.from_pretrained(load_causal(base_dir), str(d))
    re_pm.eval()
    with torch.no_grad():
        logits_reload = re_pm(**inputs).logits.float()
    assert maxdiff(logits, logits_reload) < 1e-6
    merged = re_pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        logits_merged = merged(**inputs).logits.float()
    d_merge = maxdiff(logits, logits_merged)
    d_base = maxdiff(logits, base_logits)
    assert d_merge < 1e-4, d_merge
    assert d_base > 1e-2, d_base
    save_tensors(
        {**inputs, "logits": logits, "logits_merged": logits_merged},
        d / "expected.safetensors",
        {
            "family": name,
            "base": rel(base_dir),
            "lora": f"LoraConfig(task_type=CAUSAL_LM, r=4, lora_alpha=8, target_modules={targets}, "
            "lora_dropout=0.0); scaling 2",
            "init": f"lora_A: PEFT default kaiming-uniform after torch.manual_seed({2000 + seed}); "
            f"lora_B: randn*0.1 (generator seed {3000 + seed})",
            "inputs": "same as the base fixture's expected.safetensors",
            "max_abs_diff_unmerged_vs_merged": d_merge,
            "max_abs_diff_vs_base": d_base,
            "adapter_keys": adapter_keys(d),
        },
    )
    print(f"  {name}-lora: |unmerged-merged| {d_merge:.1e}, |lora-base| {d_base:.2f}")


# --------------------------------------------------------------------------------------
# PEFT LoRA (SEQ_CLS) on qwen2 / llama
# --------------------------------------------------------------------------------------
def gen_seqcls(name: str, seed: int, inputs):
    base_dir = OUT / name
    d = OUT / f"{name}-seqcls-lora"
    fresh_dir(d)
    torch.manual_seed(4000 + seed)  # the new `score` head and lora_A init
    base = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=3, pad_token_id=PAD_ID, attn_implementation="eager", dtype=torch.float32
    )
    base.eval()
    targets = DEFAULT_LORA_TARGETS
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(5000 + seed)
    n_b = n_score = 0
    with torch.no_grad():
        for pname, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                n_b += 1
            elif "modules_to_save" in pname and "score" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                n_score += 1
    assert n_b == LAYERS * len(targets) and n_score == 1, (n_b, n_score)
    pm.eval()
    with torch.no_grad():
        logits = pm(**inputs).logits.float()
    assert logits.shape == (2, 3), logits.shape
    # Pooling = last non-pad token: row 1 alone gives the same logits.
    n1 = ROW_LENGTHS[1]
    with torch.no_grad():
        solo = pm(input_ids=inputs["input_ids"][1:, :n1]).logits.float()
    d_pool = maxdiff(solo[0], logits[1])
    assert d_pool < 1e-5, d_pool
    save_adapter(pm, d, rel(base_dir))
    re_base = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=3, pad_token_id=PAD_ID, attn_implementation="eager", dtype=torch.float32
    )
    re_pm = PeftModel.from_pretrained(re_base, str(d))
    re_pm.eval()
    with torch.no_grad():
        logits_reload = re_pm(**inputs).logits.float()
    d_reload = maxdiff(logits, logits_reload)
    assert d_reload < 1e-6, d_reload
    save_tensors(
        {**inputs, "logits": logits},
        d / "expected.safetensors",
        {
            "family": name,
            "base": rel(base_dir),
            "model": f"AutoModelForSequenceClassification.from_pretrained({rel(base_dir)}, num_labels=3, "
            f"pad_token_id={PAD_ID}) -> {type(base).__name__}; `score` Linear(64, 3, bias=False), replaced by "
            "the adapter's modules_to_save copy",
            "lora": f"LoraConfig(task_type=SEQ_CLS, r=4, lora_alpha=8, target_modules={targets}, lora_dropout=0.0); "
            "PEFT adds `score` to modules_to_save (stored as base_model.model.score.weight)",
            "init": f"torch.manual_seed({4000 + seed}) before building; lora_B randn*0.1, score randn*0.3 "
            f"(generator seed {5000 + seed})",
            "pooling": "transformers pools the logits of the LAST token whose id != pad_token_id (0) "
            "(argmax of position * (input_ids != pad)); row 1 pools position 7. Row 1 alone gives the same "
            f"logits (max diff {d_pool:.1e})",
            "logits": "[2, 3]",
            "max_abs_diff_reloaded": d_reload,
            "adapter_keys": adapter_keys(d),
        },
    )
    print(f"  {name}-seqcls-lora: logits {logits.tolist()}")


SEEDS = {"llama": 1, "llama-linear": 2, "mistral": 3, "qwen2": 4, "qwen3": 5, "gemma2": 6, "gemma3": 7, "phi3": 8}
LORA_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
SEQCLS_FAMILIES = ["qwen2", "llama"]


# --------------------------------------------------------------------------------------
# deltatune's LoRA adapters, loaded by PEFT (--ours)
# --------------------------------------------------------------------------------------
def spelling_jsonl(path: Path):
    words = ["abbey", "chilmark", "table", "river", "stone", "apple", "green", "music"]
    with open(path, "w") as f:
        for i in range(32):
            w = words[i % len(words)]
            f.write(json.dumps({"prompt": f"say {w}:", "completion": " " + " ".join(w.upper())}) + "\n")


def gen_ours(name: str, inputs, binary: Path, work: Path):
    base_dir = OUT / name
    d = OUT / f"{name}-ours"
    fresh_dir(d)
    data = work / "spelling.jsonl"
    spelling_jsonl(data)
    run_dir = work / f"{name}-run"
    cmd = [str(binary), "train", "--task", "generate", "--model", rel(base_dir / "model.gguf"),
           "--train-file", str(data), "--dev-file", str(data), "--epochs", "2", "--batch-size", "8",
           "--lr", "2e-2", "--set", 'lora.target_modules="all-linear"', "--no-progress",
           "-o", str(run_dir)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(run_dir / f, d / f)
        note(d / f)
    cfg = json.loads((d / "adapter_config.json").read_text())
    ours = {}
    with safe_open(str(d / "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():
            ours[k] = f.get_tensor(k)
    pm = PeftModel.from_pretrained(load_causal(base_dir), str(d))
    pm.eval()
    # Every tensor deltatune wrote is one of PEFT's parameters, with the same values (PEFT only
    # warns about keys it does not use).
    params = dict(pm.named_parameters())
    for k, t in ours.items():
        pk = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert pk in params, f"{name}: {k} is not a PEFT parameter"
        assert torch.equal(params[pk].detach(), t), f"{name}: {k} differs after PEFT loaded it"
    n_lora = sum(1 for k in params if ".lora_B.default." in k)
    assert n_lora * 2 == len(ours), f"{name}: PEFT made {n_lora} LoRA pairs, deltatune wrote {len(ours)} tensors"
    with torch.no_grad():
        logits = pm(**inputs).logits.float()
    with pm.disable_adapter(), torch.no_grad():
        base_logits = pm(**inputs).logits.float()
    d_base = maxdiff(logits, base_logits)
    assert d_base > 1e-3, f"{name}: the trained adapter changes the logits by only {d_base}"
    save_tensors(
        {**inputs, "logits": logits},
        d / "expected.safetensors",
        {
            "family": name,
            "base": rel(base_dir),
            "adapter": "written by deltatune: " + " ".join(cmd[1:]).replace(str(work) + "/", ""),
            "deltatune_target_modules": cfg.get("target_modules"),
            "peft": "PeftModel.from_pretrained(transformers model of the family folder, this folder); "
            f"{n_lora} LoRA pairs, every tensor of adapter_model.safetensors equal to PEFT's parameter",
            "inputs": "same as the base fixture's expected.safetensors",
            "logits": "PEFT's, float32, eager",
            "max_abs_diff_vs_base": d_base,
        },
    )
    print(f"  {name}-ours: {n_lora} LoRA pairs, |lora-base| {d_base:.3f}")


def main():
    torch.set_grad_enabled(True)
    print("versions:", json.dumps(VERSIONS))
    args = sys.argv[1:]
    if args[:1] == ["--ours"]:
        import tempfile

        binary = ROOT / "target" / "release" / "deltatune"
        wanted = args[1:] or list(LORA_FAMILIES)
        inputs = tiny_inputs()
        with tempfile.TemporaryDirectory() as work:
            for name in wanted:
                print(f"[{name}-ours]")
                gen_ours(name, inputs, binary, Path(work))
        return
    wanted = args or list(FAMILIES)
    for w in wanted:
        if w not in FAMILIES:
            raise SystemExit(f"unknown family {w!r}; known: {', '.join(FAMILIES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = tiny_inputs()
    for name in wanted:
        print(f"[{name}]")
        base_logits = gen_family(name, SEEDS[name], inputs)
        if name in LORA_FAMILIES:
            gen_lora(name, SEEDS[name], inputs, base_logits)
        if name in SEQCLS_FAMILIES:
            gen_seqcls(name, SEEDS[name], inputs)

    print("\nwrote:")
    total = 0
    for p in WRITTEN:
        sz = p.stat().st_size
        total += sz
        print(f"  {rel(p):70s} {sz:>9d} bytes")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
