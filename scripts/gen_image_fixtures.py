#!/usr/bin/env python3
"""Generate tests/fixtures/images/preprocess.json: reference values of image preprocessing.

Run with the reference venv (PyTorch; Pillow is not needed):

    .venv-ref/bin/python scripts/gen_image_fixtures.py

transformers' image processors resize with Pillow, which resamples separably (horizontal pass,
then vertical), antialiased when shrinking, rounding each pass to 8 bits. PyTorch's
`interpolate(..., antialias=True, align_corners=False)` computes the same filter weights as Pillow
(triangle for bilinear; cubic with a = -0.5 for bicubic), so each pass here is one 1-D
interpolate followed by rounding (halves up, as Pillow's fixed-point arithmetic does; torch.round
would round halves to even) and clamping to 0..255. Then the centre crop
(offsets (resized - size) // 2), rescale by 1/255 and normalisation (x - mean) / std, like
transformers' `center_crop`, `rescale` and `normalize`. The resized size for `shortest_edge` is
transformers' `get_resize_output_image_size` (the long side is int(size * long / short)).

Cases (pixels are deterministic formulas, written into the fixture too):
  grey_shortest_bilinear  7x5 (w x h) grey, shortest edge 8 -> 11x8, centre crop 8, ImageNet grey
                          mean/std, 3 output channels (grey repeated, ImageNet RGB mean/std)
  rgb_exact_bicubic_down  9x6 RGB, stretched to 4x4 (shrinking: antialiased), bicubic, ImageNet
  grey_exact_bicubic_up   5x5 grey, stretched to 12x12, bicubic, mean 0.5 std 0.5, 1 channel
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "images" / "preprocess.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def pil_like_resize(img, new_h, new_w, mode):
    """img: float64 tensor [C, H, W] of 0..255 bytes -> [C, new_h, new_w] bytes (as floats)."""
    x = img.unsqueeze(0)
    c, h, w = img.shape
    if new_w != w:
        x = F.interpolate(x, size=(h, new_w), mode=mode, antialias=True, align_corners=False)
        x = (x + 0.5).floor().clamp(0, 255)
    if new_h != h:
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        x = (x + 0.5).floor().clamp(0, 255)
    return x[0]


def shortest_edge(w, h, s):
    short, long = min(w, h), max(w, h)
    new_long = int(s * long / short)
    return (s, new_long) if w <= h else (new_long, s)


def preprocess(pixels, w, h, c, resize, size, mode, mean, std, out_channels):
    img = torch.tensor(pixels, dtype=torch.float64).reshape(h, w, c).permute(2, 0, 1)
    if resize[0] == "shortest_edge":
        rw, rh = shortest_edge(w, h, resize[1])
    else:
        rw, rh = resize[1], resize[1]
    img = pil_like_resize(img, rh, rw, mode)
    top, left = (rh - size) // 2, (rw - size) // 2
    img = img[:, top : top + size, left : left + size]
    if c == 1 and out_channels == 3:
        img = img.repeat(3, 1, 1)
    img = img / 255.0
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    return ((img - m) / s).flatten().tolist()


def case(name, w, h, c, formula, resize, size, mode, mean, std, out_channels):
    pixels = [formula(i) % 256 for i in range(w * h * c)]
    return {
        "name": name,
        "width": w,
        "height": h,
        "channels": c,
        "pixels": pixels,
        "resize": {"mode": resize[0], "n": resize[1]},
        "size": size,
        "filter": mode,
        "mean": mean,
        "std": std,
        "out_channels": out_channels,
        "expected_chw": preprocess(pixels, w, h, c, resize, size, mode, mean, std, out_channels),
    }


def main():
    cases = [
        case("grey_shortest_bilinear", 7, 5, 1, lambda i: (i * 37 + 11) ** 2 // 7,
             ("shortest_edge", 8), 8, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 3),
        case("rgb_exact_bicubic_down", 9, 6, 3, lambda i: i * 53 + (i // 7) * 19,
             ("exact", 4), 4, "bicubic", IMAGENET_MEAN, IMAGENET_STD, 3),
        case("grey_exact_bicubic_up", 5, 5, 1, lambda i: 255 if (i * 7) % 3 == 0 else (i * 29) % 90,
             ("exact", 12), 12, "bicubic", [0.5], [0.5], 1),
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    info = {"generator": "scripts/gen_image_fixtures.py", "torch": torch.__version__}
    OUT.write_text(json.dumps({"info": info, "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
