"""Writes tests/fixtures/tiny-vit: a tiny random ViTForImageClassification (transformers) and its
outputs, for the ViT model tests (crates/deltatune-models/tests/vit.rs).

Run with the reference venv (scripts/setup_ref_venv.sh):
    .venv-ref/bin/python scripts/gen_vit_tiny_fixture.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-vit"


def main():
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        image_size=16,
        patch_size=4,
        num_channels=3,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(cfg).eval()
    # Random (not default-initialised) position embeddings and CLS, so interpolation shows.
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.normal_(0, 0.5)
        model.vit.embeddings.cls_token.normal_(0, 0.5)
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    square = torch.randn(2, 3, 16, 16, generator=g)
    # 22 x 12 pixels: a 5 x 3 grid (two pixels dropped as the convolution drops them); the
    # position embeddings are interpolated from 4 x 4.
    odd = torch.randn(1, 3, 22, 12, generator=g)
    with torch.no_grad():
        a = model(pixel_values=square, output_hidden_states=True)
        b = model(pixel_values=odd, output_hidden_states=True, interpolate_pos_encoding=True)
    tensors = {
        "square.pixels": square,
        "square.hidden": a.hidden_states[-1],  # before the final layernorm
        "square.logits": a.logits,
        "odd.pixels": odd,
        "odd.logits": b.logits,
    }
    with torch.no_grad():
        tensors["square.last_hidden_state"] = model.vit.layernorm(a.hidden_states[-1])
        tensors["odd.last_hidden_state"] = model.vit.layernorm(b.hidden_states[-1])
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "expected.safetensors")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
