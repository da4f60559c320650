"""The PyTorch + PEFT side of deltatune's image task: LoRA on transformers' Dinov2 (DINOv2
ViT-S/14, the folder `deltatune convert --onnx` / `deltatune fetch` writes) on Fashion-MNIST.

Reads `data.json` from the output folder of a `deltatune train --task image` run: the class
names, the image size and, per split, the IDX images file and the indices (and labels) of the
exact images the run used. So both sides train and test on the same images.

Preprocessing, as deltatune's default for a 3-channel model without preprocessor_config.json:
the 28 x 28 grey image resized to image_size (shortest edge, then centre crop; bilinear, Pillow's
separable resampling with 8-bit rounding after each pass, the same function as
scripts/gen_image_fixtures.py whose fixture deltatune's preprocessing matches), grey repeated to
RGB, x / 255, ImageNet mean and std. Done per batch inside the timed epoch (deltatune decodes
batches on a worker thread, also inside its timed epoch).

Model: transformers' Dinov2ForImageClassification from the converted folder (its head reads
[CLS, mean of the patch tokens], as deltatune's), num_labels from data.json, PEFT LoRA on
`query`/`value` (`q_proj`/`v_proj` in transformers 5) with the classifier in modules_to_save.

Training, as deltatune does it: batches drawn from torch.randperm with a torch.Generator
seeded with --seed, f32, LoRA dropout active; AdamW (betas 0.9/0.999, eps 1e-8,
--weight-decay) on the trainable parameters, clipping at --max-grad-norm, linear warm-up over
ceil(warmup_ratio * total steps) then linear decay to 0; cross-entropy. Dev accuracy after
each epoch, test at the end (batches of --eval-batch-size under inference_mode). Seconds per
epoch count training only; peak RSS is the process's.

Set-up (not part of CI): bash scripts/setup_ref_venv.sh
Run:    deltatune train --task image                      # writes runs/lora-fashion-mnist/
        .venv-ref/bin/python scripts/peft_vit.py --run runs/lora-fashion-mnist --out peft-vit.json
"""
import argparse
import gzip
import json
import math
import os
import platform
import struct
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_image_fixtures import pil_like_resize, shortest_edge  # noqa: E402
from refrun import Progress, rss_peak_mib  # noqa: E402

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--run", required=True, help="output folder of `deltatune train --task image`")
ap.add_argument("--model", default=os.path.expanduser("~/.cache/deltatune/models/dinov2-vits14"))
ap.add_argument("--epochs", type=int, default=1)
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--r", type=int, default=8)
ap.add_argument("--lora-alpha", type=float, default=16)
ap.add_argument("--lora-dropout", type=float, default=0.1)
ap.add_argument("--target-modules", default="auto",
                help="comma-separated; auto: query,value (or q_proj,v_proj, transformers 5's names)")
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--warmup-ratio", type=float, default=0.06)
ap.add_argument("--weight-decay", type=float, default=0.0)
ap.add_argument("--max-grad-norm", type=float, default=1.0)
ap.add_argument("--eval-batch-size", type=int, default=64)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", required=True, help="results JSON path")
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)

import peft  # noqa: E402  (after set_num_threads)
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Dinov2ForImageClassification, get_linear_schedule_with_warmup  # noqa: E402


_idx_cache = {}


def read_idx_images(path):
    """An IDX3 unsigned-byte images file (gzipped or not) -> (bytes, count, rows, cols)."""
    if path not in _idx_cache:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
        magic, n, rows, cols = struct.unpack(">IIII", data[:16])
        if magic != 0x00000803:
            sys.exit(f"{path}: not an IDX3 unsigned-byte images file (magic {magic:#x})")
        if len(data) != 16 + n * rows * cols:
            sys.exit(f"{path}: {len(data)} bytes, expected {16 + n * rows * cols}")
        _idx_cache[path] = (data[16:], n, rows, cols)
    return _idx_cache[path]


def load_split(manifest):
    """[(pixels bytes, w, h)], labels for a split of data.json (IDX splits only)."""
    if "idx_images" not in manifest:
        sys.exit("this script reads IDX splits (Fashion-MNIST); the run used image files")
    data, n, rows, cols = read_idx_images(manifest["idx_images"])
    images = []
    for i in manifest["indices"]:
        if not 0 <= i < n:
            sys.exit(f"{manifest['idx_images']}: index {i} outside its {n} images")
        images.append(data[i * rows * cols:(i + 1) * rows * cols])
    return images, (cols, rows), torch.tensor(manifest["labels"], dtype=torch.long)


def preprocess(images, wh, size):
    """Grey byte images -> [N, 3, size, size] float32, as deltatune's default preprocessing."""
    w, h = wh
    x = torch.tensor(bytearray(b"".join(images)), dtype=torch.float64).reshape(len(images), 1, h, w)
    rw, rh = shortest_edge(w, h, size)
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    top, left = (rh - size) // 2, (rw - size) // 2
    for k in range(len(images)):
        img = pil_like_resize(x[k], rh, rw, "bilinear")[:, top:top + size, left:left + size]
        out[k] = ((img.repeat(3, 1, 1) / 255.0 - mean) / std).float()
    return out


@torch.inference_mode()
def evaluate(model, images, wh, labels, size, desc):
    model.eval()
    t0 = time.perf_counter()
    correct = 0
    prog = Progress(len(images), desc)
    for s in range(0, len(images), args.eval_batch_size):
        px = preprocess(images[s:s + args.eval_batch_size], wh, size)
        logits = model(pixel_values=px).logits
        correct += (logits.argmax(-1) == labels[s:s + args.eval_batch_size]).sum().item()
        prog.update(len(px))
    return {"accuracy": correct / len(images), "n": len(images),
            "seconds": time.perf_counter() - t0}


def main():
    with open(os.path.join(args.run, "data.json")) as f:
        manifest = json.load(f)
    size = manifest["image_size"]
    classes = manifest["classes"]
    train_x, wh, train_y = load_split(manifest["train"])
    dev_x, dev_wh, dev_y = load_split(manifest["dev"])
    test_x, test_wh, test_y = load_split(manifest["test"])

    t0 = time.perf_counter()
    model = Dinov2ForImageClassification.from_pretrained(
        args.model, num_labels=len(classes), dtype=torch.float32)
    load_seconds = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    if args.target_modules == "auto":
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = ["query", "value"] if "query" in names else ["q_proj", "v_proj"]
    else:
        targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    model = get_peft_model(model, LoraConfig(
        r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, modules_to_save=["classifier"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = {
        "method": "peft-lora",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "settings": dict(vars(args)),
        "image_size": size,
        "load_seconds": load_seconds,
        "train_examples": len(train_x),
        "dev_examples": len(dev_x),
        "test_examples": len(test_x),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = math.ceil(args.warmup_ratio * total)
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    gen = torch.Generator().manual_seed(args.seed)
    result.update(steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup,
                  seconds_per_epoch=[], train_loss_per_epoch=[], dev_per_epoch=[])
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen).tolist()
        prog = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}")
        t_ep, loss_sum = time.perf_counter(), 0.0
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            px = preprocess([train_x[i] for i in idx], wh, size)
            loss = F.cross_entropy(model(pixel_values=px).logits, train_y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.item()
            prog.update(1, loss=f"{loss.item():.4f}")
        secs = time.perf_counter() - t_ep
        result["seconds_per_epoch"].append(secs)
        result["train_loss_per_epoch"].append(loss_sum / steps_per_epoch)
        dev = evaluate(model, dev_x, dev_wh, dev_y, size, "dev")
        result["dev_per_epoch"].append(dev["accuracy"])
        print(f"epoch {epoch + 1}: train loss {loss_sum / steps_per_epoch:.4f}, dev accuracy "
              f"{dev['accuracy']:.4f}, {secs:.1f} s ({len(train_x) / secs:.1f} images/s)",
              file=sys.stderr)
    result["dev"] = dev
    result["test"] = evaluate(model, test_x, test_wh, test_y, size, "test")
    result["mean_train_seconds_per_epoch"] = sum(result["seconds_per_epoch"]) / args.epochs
    result["peak_rss_mib"] = rss_peak_mib()
    print(f"test accuracy {result['test']['accuracy']:.4f}; "
          f"{result['mean_train_seconds_per_epoch']:.1f} s/epoch; "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
