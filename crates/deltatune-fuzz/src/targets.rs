//! The fuzz targets: for each loader, its seeds, its mutator and how one case is run.
//!
//! A case's result is `Ok(())` or a clean error (`Err(message)`); a panic, a hang or a heap
//! peak over the limit is a failure, decided by the harness.

use std::path::{Path, PathBuf};

use candle_core::DType;
use deltatune_core::Rng;
use serde_json::Value;

use crate::mutate::{binary_case, json_case, pick, text_case, toml_case};
use crate::{gguf_mut, safetensors_mut, settings};

pub type Seeds = Vec<Vec<u8>>;

pub struct Target {
    pub name: &'static str,
    /// What the target loads, for the table and the docs.
    pub about: &'static str,
    /// File name the case is written to (the extension picks the format for some loaders).
    pub file: &'static str,
    pub seeds: fn() -> anyhow::Result<Seeds>,
    pub mutate: fn(&mut Rng, &Seeds) -> Vec<u8>,
    pub run: fn(&Path) -> Result<(), String>,
}

pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "safetensors",
            about: "Weights::load (model and adapter safetensors), then every tensor fetched",
            file: "model.safetensors",
            seeds: safetensors_seeds,
            mutate: |rng, s| {
                if rng.below(2) == 0 {
                    safetensors_mut::case(rng, s)
                } else {
                    let seed = pick(rng, s);
                    let header = safetensors_mut::split(seed).map_or(4096, |_| {
                        8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize
                    });
                    binary_case(rng, s, header)
                }
            },
            run: run_safetensors,
        },
        Target {
            name: "gguf",
            about: "GgufFile::open, every tensor read, the GGUF tokenizer, Decoder::load",
            file: "model.gguf",
            seeds: gguf_mut::seeds,
            mutate: |rng, s| gguf_mut::case(rng, s),
            run: run_gguf,
        },
        Target {
            name: "adapter-config",
            about: "adapter_config.json: DeltaConfig::from_json + validate",
            file: "adapter_config.json",
            seeds: adapter_config_seeds,
            mutate: |rng, s| json_case(rng, s, ADAPTER_KEYS),
            run: run_adapter_config,
        },
        Target {
            name: "csv",
            about: "load_examples on .csv (RFC 4180 quoting)",
            file: "data.csv",
            seeds: csv_seeds,
            mutate: |rng, s| text_case(rng, s),
            run: |p| run_examples(p),
        },
        Target {
            name: "tsv",
            about: "load_examples on .tsv",
            file: "data.tsv",
            seeds: tsv_seeds,
            mutate: |rng, s| text_case(rng, s),
            run: |p| run_examples(p),
        },
        Target {
            name: "jsonl",
            about: "load_examples on .jsonl (classification)",
            file: "data.jsonl",
            seeds: jsonl_seeds,
            mutate: |rng, s| {
                if rng.below(2) == 0 {
                    jsonl_structural(rng, s, &["text", "label"])
                } else {
                    text_case(rng, s)
                }
            },
            run: |p| run_examples(p),
        },
        Target {
            name: "gen-jsonl",
            about: "load_generation_jsonl (prompt/completion and chat messages)",
            file: "gen.jsonl",
            seeds: gen_jsonl_seeds,
            mutate: |rng, s| {
                if rng.below(2) == 0 {
                    jsonl_structural(
                        rng,
                        s,
                        &["prompt", "completion", "messages", "role", "content"],
                    )
                } else {
                    text_case(rng, s)
                }
            },
            run: run_gen_jsonl,
        },
        Target {
            name: "cmudict",
            about: "load_cmudict (CMUdict pronunciation dictionary)",
            file: "cmudict.dict",
            seeds: cmudict_seeds,
            mutate: |rng, s| text_case(rng, s),
            run: run_cmudict,
        },
        Target {
            name: "space",
            about: "search-space TOML: Space::load, then random and TPE samples",
            file: "space.toml",
            seeds: space_seeds,
            mutate: |rng, s| toml_case(rng, s, SPACE_KEYS),
            run: run_space,
        },
        Target {
            name: "settings",
            about: "settings TOML (--config): the CLI's settings::resolve",
            file: "config.toml",
            seeds: settings_seeds,
            mutate: |rng, s| toml_case(rng, s, SETTINGS_KEYS),
            run: run_settings,
        },
        Target {
            name: "bert-config",
            about: "config.json of a BERT folder: BertClassifier::load (tiny-bert weights)",
            file: "config.json",
            seeds: bert_config_seeds,
            mutate: |rng, s| json_case(rng, s, MODEL_CONFIG_KEYS),
            run: run_bert_config,
        },
        Target {
            name: "llama-config",
            about: "config.json of a Llama folder: Decoder::load (tiny-llama weights)",
            file: "config.json",
            seeds: llama_config_seeds,
            mutate: |rng, s| json_case(rng, s, MODEL_CONFIG_KEYS),
            run: run_llama_config,
        },
        Target {
            name: "tokenizer",
            about: "tokenizer.json: TextTokenizer::load + encode_batch",
            file: "tokenizer.json",
            seeds: tokenizer_seeds,
            mutate: |rng, s| json_case(rng, s, TOKENIZER_KEYS),
            run: run_tokenizer,
        },
        Target {
            name: "onnx",
            about: "OnnxModel::open, every initializer read as f32, the DINOv2 mapping",
            file: "model.onnx",
            seeds: onnx_seeds,
            mutate: |rng, s| binary_case(rng, s, 4096),
            run: run_onnx,
        },
        Target {
            name: "idx",
            about: "IDX images and labels (Fashion-MNIST's format), gzip or raw",
            file: "images-idx3-ubyte",
            seeds: idx_seeds,
            mutate: |rng, s| binary_case(rng, s, 64),
            run: run_idx,
        },
        Target {
            name: "image",
            about: "an image file (PNG/JPEG) decoded and preprocessed to 32 x 32 RGB",
            file: "image.png",
            seeds: image_seeds,
            mutate: |rng, s| binary_case(rng, s, 256),
            run: run_image,
        },
    ]
}

fn onnx_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![fixture("onnx/small.onnx")?];
    if let Ok(b) = fixture("tiny-dinov2/model.onnx") {
        v.push(b);
    }
    Ok(v)
}

fn run_onnx(p: &Path) -> Result<(), String> {
    let m = deltatune_core::onnx::OnnxModel::open(p).map_err(|e| e.to_string())?;
    let names: Vec<String> = m.initializer_names().map(|s| s.to_string()).collect();
    for n in names {
        let _ = m.tensor(&n);
    }
    deltatune_models::vit::dinov2_from_onnx(p)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn idx_seeds() -> anyhow::Result<Seeds> {
    // 3 images of 4 x 5 bytes, and 3 labels.
    let mut img = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5];
    img.extend((0..60u8).map(|i| i.wrapping_mul(37)));
    let lab = vec![0, 0, 8, 1, 0, 0, 0, 3, 2, 7, 9];
    Ok(vec![img, lab])
}

fn run_idx(p: &Path) -> Result<(), String> {
    deltatune_data::idx::read_idx(p)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn image_seeds() -> anyhow::Result<Seeds> {
    let mut v = Vec::new();
    for (w, h) in [(3u32, 2u32), (16, 9)] {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        v.push(png);
        let mut jpg = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )?;
        v.push(jpg);
    }
    Ok(v)
}

fn run_image(p: &Path) -> Result<(), String> {
    use deltatune_data::images::{ImageExample, ImageSource, Preprocess};
    let pre = Preprocess::for_model(3)
        .map_err(|e| e.to_string())?
        .with_size(32);
    let ex = ImageExample {
        source: ImageSource::File(p.to_path_buf()),
        label: 0,
    };
    pre.process(&ex, 0, 0)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------- seeds

/// The repository root (seed files live in tests/fixtures and examples).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cache_dir() -> PathBuf {
    deltatune_data::assets::default_cache_dir()
}

/// The first `max` bytes of `path`, cut at a line end (None when the file is absent).
fn head(path: &Path, max: usize) -> Option<Vec<u8>> {
    let mut b = std::fs::read(path).ok()?;
    if b.len() > max {
        b.truncate(max);
        if let Some(nl) = b.iter().rposition(|&c| c == b'\n') {
            b.truncate(nl + 1);
        }
    }
    Some(b)
}

fn fixture(rel: &str) -> anyhow::Result<Vec<u8>> {
    let p = repo_root().join("tests/fixtures").join(rel);
    std::fs::read(&p).map_err(|e| anyhow::anyhow!("reading seed {}: {e}", p.display()))
}

/// A safetensors file written by hand: one tensor of each dtype candle reads.
fn handmade_safetensors() -> Vec<u8> {
    let entries: &[(&str, &str, &[u64], usize)] = &[
        ("a.f32", "F32", &[2, 3], 4),
        ("b.f16", "F16", &[4], 2),
        ("c.bf16", "BF16", &[2, 2], 2),
        ("d.f64", "F64", &[1], 8),
        ("e.i64", "I64", &[3], 8),
        ("f.u8", "U8", &[5], 1),
        ("g.u32", "U32", &[2], 4),
        ("h.empty", "F32", &[0, 4], 4),
        ("i.scalar", "F32", &[], 4),
        ("j.f8", "F8_E4M3", &[4], 1),
    ];
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, dtype, shape, size) in entries {
        let n: u64 = shape.iter().product();
        let start = data.len();
        for i in 0..(n as usize * size) {
            data.push((i * 37 % 61) as u8 & 0x3f);
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

fn safetensors_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![handmade_safetensors()];
    for rel in [
        "tiny-bert/model.safetensors",
        "tiny-bert/expected.safetensors",
        "tiny-bert-lora/adapter_model.safetensors",
        "tiny-bert-ia3/adapter_model.safetensors",
        "tiny-llama-lora/adapter_model.safetensors",
        "tiny-llama-ia3/adapter_model.safetensors",
        "smollm2/weights_probe.safetensors",
    ] {
        v.push(fixture(rel)?);
    }
    // The real MiniLM checkpoint's header (its 100+ real keys) with the first 64 KiB of data:
    // the offsets mostly run past the end, which is itself a case to reject cleanly.
    let real = cache_dir().join("models/all-MiniLM-L6-v2/model.safetensors");
    if let Ok(mut f) = std::fs::File::open(&real) {
        use std::io::Read;
        let mut n = [0u8; 8];
        if f.read_exact(&mut n).is_ok() {
            let hl = u64::from_le_bytes(n) as usize;
            if hl < 1 << 20 {
                let mut rest = vec![0u8; hl + (64 << 10)];
                if f.read_exact(&mut rest).is_ok() {
                    let mut b = n.to_vec();
                    b.extend_from_slice(&rest);
                    v.push(b);
                }
            }
        }
    }
    Ok(v)
}

/// Every key an adapter config may have (for "add a known key" mutations).
const ADAPTER_KEYS: &[&str] = &[
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "use_rslora",
    "use_dora",
    "bias",
    "fan_in_fan_out",
    "init_lora_weights",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "feedforward_modules",
    "num_virtual_tokens",
    "token_dim",
    "num_layers",
    "num_attention_heads",
    "encoder_hidden_size",
    "prefix_projection",
    "num_transformer_submodules",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "bottleneck_size",
    "deltas",
    "gates",
    "lr_scale",
    "subspace",
    "intrinsic_dim",
    "base_model_name_or_path",
    "inference_mode",
    "exclude_modules",
];

fn adapter_config_seeds() -> anyhow::Result<Seeds> {
    let mut v = Vec::new();
    for d in [
        "tiny-bert-ia3",
        "tiny-bert-lora",
        "tiny-bert-lora-rslora",
        "tiny-llama-ia3",
        "tiny-llama-lora",
        "tiny-llama-prefix",
        "tiny-llama-prompt",
    ] {
        v.push(fixture(&format!("{d}/adapter_config.json"))?);
    }
    // Every method's defaults, as the settings serialise them (sections named like the
    // methods), and a composition of two.
    let s = serde_json::to_value(settings::Settings::default())?;
    for m in [
        "lora",
        "ia3",
        "bitfit",
        "prompt",
        "prefix",
        "adapter",
        "intrinsic",
    ] {
        if let Some(c) = s.get(m) {
            v.push(serde_json::to_vec_pretty(c)?);
        }
    }
    if let (Some(l), Some(p)) = (s.get("lora"), s.get("prefix")) {
        v.push(serde_json::to_vec_pretty(&serde_json::json!({
            "peft_type": "COMPOSITION",
            "task_type": "SEQ_CLS",
            "deltas": [l, p],
            "gates": true,
            "lr_scale": {"lora": 2.0},
            "modules_to_save": ["classifier"],
        }))?);
    }
    Ok(v)
}

const RT_CSV: &str =
    "text,label\n\"a gripping, \"\"funny\"\" film\",1\nflat and dull,0\n\"spans\ntwo lines\",1\n";

fn csv_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![
        RT_CSV.as_bytes().to_vec(),
        b"\xef\xbb\xbfid,label,text\r\n1,pos,good\r\n2,neg,bad\r\n".to_vec(),
        b"text,label\n".to_vec(),
    ];
    if let Some(b) = head(&cache_dir().join("data/rotten_tomatoes/dev.csv"), 4096) {
        v.push(b);
    }
    Ok(v)
}

fn tsv_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![
        b"text\tlabel\na \"quoted\" film\t1\nflat\t0\n".to_vec(),
        b"label\ttext\textra\npos\tfine\t\nneg\tbad\tx\n".to_vec(),
    ];
    if let Some(b) = head(&cache_dir().join("data/rotten_tomatoes/dev.csv"), 4096) {
        // The same rows as TSV (commas inside quotes kept as text).
        let s = String::from_utf8_lossy(&b).replace(',', "\t");
        v.push(s.into_bytes());
    }
    Ok(v)
}

fn jsonl_seeds() -> anyhow::Result<Seeds> {
    Ok(vec![
        b"{\"text\": \"good\", \"label\": 1}\n{\"text\": \"bad\", \"label\": \"neg\"}\n\n{\"text\": \"ok\", \"label\": true, \"x\": [1]}\n".to_vec(),
        b"{\"label\": 0.5, \"text\": \"caf\\u00e9 \\ud83d\\ude00\"}\r\n".to_vec(),
    ])
}

fn gen_jsonl_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![
        b"{\"prompt\": \"hello\", \"completion\": \" world\"}\n".to_vec(),
        br#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
{"prompt": "", "completion": "x", "extra": null}
"#
        .to_vec(),
    ];
    if let Some(b) = head(&cache_dir().join("data/cmudict/dev.jsonl"), 4096) {
        v.push(b);
    }
    Ok(v)
}

fn cmudict_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![
        b"hello HH AH0 L OW1\nhello(2) HH EH0 L OW1\nworld W ER1 L D # comment\n# only a comment\n"
            .to_vec(),
        // cmudict-0.7b's `;;;` comment lines, which the loader refuses by line number.
        b";;; # CMUdict  --  Major Version: 0.07\nhello HH AH0 L OW1\n".to_vec(),
    ];
    if let Some(b) = head(&cache_dir().join("data/cmudict/cmudict.dict"), 4096) {
        v.push(b);
    }
    Ok(v)
}

const SPACE_KEYS: &[&str] = &[
    "direction",
    "methods",
    "train",
    "float",
    "int",
    "choice",
    "log",
    "step",
    "lr",
    "r",
    "epochs",
];

fn space_seeds() -> anyhow::Result<Seeds> {
    let mut v = Vec::new();
    for f in ["examples/rt-space.toml", "examples/g2p-space.toml"] {
        let p = repo_root().join(f);
        v.push(std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?);
    }
    v.push(
        b"direction = \"minimize\"\n[train]\nx = { int = [-9223372036854775808, 9223372036854775807] }\ny = { float = [-1e308, 1e308] }\n[methods.lora]\nr = { int = [1, 1000000], log = true, step = 7 }\nz = { choice = [1, \"a\", 2.5, true, [1], {a = 1}] }\n"
            .to_vec(),
    );
    Ok(v)
}

const SETTINGS_KEYS: &[&str] = &[
    "task",
    "model",
    "method",
    "pooling",
    "data",
    "train",
    "lora",
    "prompt",
    "prefix",
    "compose",
    "generation",
    "epochs",
    "lr",
    "batch_size",
    "max_length",
    "r",
    "methods",
    "train_shard",
    "seed",
];

fn settings_seeds() -> anyhow::Result<Seeds> {
    let s = settings::Settings::default();
    let sources: Vec<(String, settings::Source)> = Vec::new();
    let full = settings::show(&s, &sources)?;
    Ok(vec![
        full.into_bytes(),
        b"task = \"generate\"\nmethod = \"compose\"\n[compose]\nmethods = [\"lora\", \"prefix\"]\n[train]\nepochs = 2\nlr = 0.001\n".to_vec(),
        b"method = \"lora\"\n[lora]\nr = 8\ntarget_modules = [\"query\", \"value\"]\n[data]\nmax_length = 64\ntrain_shard = \"1/3\"\n".to_vec(),
    ])
}

const TOKENIZER_KEYS: &[&str] = &[
    "model",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "added_tokens",
    "truncation",
    "padding",
    "vocab",
    "merges",
    "unk_token",
    "type",
    "id",
    "content",
    "special",
    "max_input_chars_per_word",
    "continuing_subword_prefix",
    "single",
    "pair",
    "special_tokens",
    "pretokenizers",
];

fn tokenizer_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![fixture("tiny-bert/tokenizer.json")?];
    // A byte-level BPE tokenizer.json, as the GGUF loader builds it.
    let dir = std::env::temp_dir().join(format!("deltatune-fuzz-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("seed.gguf");
    std::fs::write(
        &p,
        gguf_mut::seed(&gguf_mut::SeedOpts {
            layers: 1,
            tied: true,
            matrix: candle_core::quantized::GgmlDType::Q8_0,
            bos_eos: true,
        })?,
    )?;
    let g = deltatune_core::GgufFile::open(&p)?;
    let tok = deltatune_models::gguf_tokenizer::tokenizer_from_gguf(&g)?;
    v.push(
        tok.to_string(true)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_bytes(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(v)
}

const MODEL_CONFIG_KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "hidden_act",
    "model_type",
    "eos_token_id",
    "bos_token_id",
    "pad_token_id",
    "id2label",
    "torch_dtype",
];

fn bert_config_seeds() -> anyhow::Result<Seeds> {
    let mut v = vec![fixture("tiny-bert/config.json")?];
    if let Ok(b) = std::fs::read(cache_dir().join("models/all-MiniLM-L6-v2/config.json")) {
        v.push(b);
    }
    Ok(v)
}

fn llama_config_seeds() -> anyhow::Result<Seeds> {
    Ok(vec![fixture("tiny-llama/config.json")?])
}

/// Puts fixture files next to the case's config.json (once per process).
fn siblings(p: &Path, fixture_dir: &str, names: &[&str]) -> Result<PathBuf, String> {
    let dir = p.parent().unwrap_or(Path::new(".")).to_path_buf();
    for n in names {
        let to = dir.join(n);
        if !to.exists() {
            let from = repo_root().join("tests/fixtures").join(fixture_dir).join(n);
            std::fs::copy(&from, &to)
                .map_err(|e| format!("fuzz set-up: {}: {e}", from.display()))?;
        }
    }
    Ok(dir)
}

fn run_bert_config(p: &Path) -> Result<(), String> {
    let dir = siblings(p, "tiny-bert", &["model.safetensors", "tokenizer.json"])?;
    let mut rng = Rng::new(0);
    deltatune_models::BertClassifier::load(&dir, 3, deltatune_models::Pooling::Cls, &mut rng)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn run_llama_config(p: &Path) -> Result<(), String> {
    let dir = siblings(p, "tiny-llama", &["model.safetensors"])?;
    deltatune_models::Decoder::load(&dir)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// JSON lines: a line parsed and structurally mutated, lines duplicated or dropped.
fn jsonl_structural(rng: &mut Rng, seeds: &Seeds, keys: &[&str]) -> Vec<u8> {
    let seed = pick(rng, seeds);
    let mut lines: Vec<Vec<u8>> = seed.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let i = rng.below(lines.len());
    let one = vec![lines[i].clone()];
    lines[i] = json_case(rng, &one, keys)
        .into_iter()
        .filter(|&b| b != b'\n')
        .collect();
    lines.join(&b'\n')
}

// ---------------------------------------------------------------- runs

fn run_safetensors(p: &Path) -> Result<(), String> {
    let w = deltatune_core::Weights::load(p, DType::F32).map_err(|e| e.to_string())?;
    let keys: Vec<String> = w.keys().map(str::to_string).collect();
    for k in &keys {
        let dims = w
            .tensors()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.dims().to_vec())
            .unwrap_or_default();
        let t = w.get(k, &dims, "").map_err(|e| e.to_string())?;
        // Touch the data (a lying shape/offset pair would show here).
        if t.dtype() == DType::F32 {
            let _ = t
                .flatten_all()
                .and_then(|t| t.sum_all())
                .map_err(|e| e.to_string())?;
        }
    }
    let _ = w.unused();
    Ok(())
}

fn run_gguf(p: &Path) -> Result<(), String> {
    let s = |e: deltatune_core::Error| e.to_string();
    let file = deltatune_core::GgufFile::open(p).map_err(s)?;
    let _ = file.summary();
    let mut first_err = None;
    for n in file.tensor_names() {
        if let Err(e) = file.tensor(n) {
            first_err.get_or_insert(e.to_string());
        }
    }
    match deltatune_models::gguf_tokenizer::tokenizer_from_gguf(&file) {
        Ok(tok) => {
            let _ = tok.encode("hello world 12 <|im_end|><tool>", true);
        }
        Err(e) => {
            first_err.get_or_insert(e.to_string());
        }
    }
    drop(file);
    let g = deltatune_models::decoder::gguf::load_gguf(p).map_err(s)?;
    let _ = g.tokenizer.encode("hello world", true);
    let m = deltatune_models::Decoder::from_gguf(g, p).map_err(s)?;
    let _ = m.config.kv_width();
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn run_adapter_config(p: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let c = deltatune_methods::DeltaConfig::from_json(v).map_err(|e| e.to_string())?;
    c.validate().map_err(|e| e.to_string())
}

fn run_examples(p: &Path) -> Result<(), String> {
    deltatune_data::text::load_examples(p, "text", "label")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn run_gen_jsonl(p: &Path) -> Result<(), String> {
    deltatune_data::generation::load_generation_jsonl(p, "prompt", "completion")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn run_cmudict(p: &Path) -> Result<(), String> {
    deltatune_data::g2p::load_cmudict(p)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn run_space(p: &Path) -> Result<(), String> {
    use deltatune_search::sampler::{Observation, RandomSampler, Sampler, TpeSampler};
    let space = deltatune_search::space::Space::load(p).map_err(|e| e.to_string())?;
    let mut rng = Rng::new(3);
    let mut history = Vec::new();
    for i in 0..4 {
        let params = RandomSampler.sample(&space, &history, &mut rng);
        history.push(Observation {
            params,
            value: i as f64,
        });
    }
    let tpe = TpeSampler {
        n_startup: 2,
        ..TpeSampler::default()
    };
    let _ = tpe.sample(&space, &history, &mut rng);
    Ok(())
}

fn run_settings(p: &Path) -> Result<(), String> {
    settings::resolve(Some(p), &|_| None, &[])
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

fn run_tokenizer(p: &Path) -> Result<(), String> {
    let t = deltatune_models::TextTokenizer::load(p, 16).map_err(|e| e.to_string())?;
    t.encode_batch(&["hello world", "", "a  b\tc 12 \u{e9}\u{301} \u{1f600}"])
        .map(|_| ())
        .map_err(|e| e.to_string())
}
