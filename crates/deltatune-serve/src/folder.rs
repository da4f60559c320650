//! Adapter folders on the server: those read at start (an adapter directory) and the paths a
//! client may load from at run time.

use std::path::{Component, Path, PathBuf};

pub use deltatune_train::adapter_folder::{head_rows, AdapterFolder, AdapterTask};
use deltatune_train::artifact::ADAPTER_CONFIG;

use crate::{Result, ServeError};

/// Reads an adapter folder; an error names the request's `path`.
pub fn read(name: &str, dir: &Path, base_dir: Option<&Path>) -> Result<AdapterFolder> {
    AdapterFolder::read(name, dir, base_dir).map_err(|e| ServeError::field("path", e.to_string()))
}

/// The folder an adapter named by a client resolves to inside the configured adapter
/// directory: a relative path of plain components only (no `..`, no root), and after resolving
/// links still inside the directory.
pub fn resolve_in(root: &Path, rel: &str) -> Result<PathBuf> {
    let outside = || {
        ServeError::field(
            "path",
            format!(
                "`{rel}` is not a folder inside the adapter directory {}: give a name relative to it (no `..`, no absolute path)",
                root.display()
            ),
        )
    };
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let root_c = root
        .canonicalize()
        .map_err(|e| ServeError::new(format!("the adapter directory {}: {e}", root.display())))?;
    let full = root_c.join(p);
    let full_c = full.canonicalize().map_err(|_| {
        ServeError::field(
            "path",
            format!("no adapter folder `{rel}` in {}", root.display()),
        )
    })?;
    if !full_c.starts_with(&root_c) {
        return Err(ServeError::field(
            "path",
            format!(
                "`{rel}` in the adapter directory {} leads to {}, outside it: adapters are served only from inside the directory (copy the folder in, or name it with --adapter NAME=DIR)",
                root.display(),
                full_c.display()
            ),
        ));
    }
    Ok(full_c)
}

/// The adapter folders directly under `root` (those holding an adapter_config.json), by name.
/// An entry that leads outside `root` (a link) is refused as [`resolve_in`] refuses it at run
/// time.
pub fn scan(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(root).map_err(|e| {
        ServeError::new(format!(
            "reading the adapter directory {}: {e}",
            root.display()
        ))
    })?;
    for entry in rd.flatten() {
        let p = entry.path();
        if p.join(ADAPTER_CONFIG).is_file() {
            if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                resolve_in(root, n)?;
                out.push((n.to_string(), p));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_refuses_paths_outside_the_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        assert!(resolve_in(d.path(), "a").is_ok());
        for bad in ["../a", "/etc", "a/../../x", "", "./a/.."] {
            let e = resolve_in(d.path(), bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("path"), "{bad}");
        }
        // A link inside pointing outside is refused after resolving it.
        let out = tempfile::tempdir().unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(out.path(), d.path().join("link")).unwrap();
            let e = resolve_in(d.path(), "link").unwrap_err();
            let want = format!(
                "`link` in the adapter directory {} leads to {}, outside it: adapters are served only from inside the directory (copy the folder in, or name it with --adapter NAME=DIR)",
                d.path().display(),
                out.path().canonicalize().unwrap().display()
            );
            assert_eq!(e.message, want);
            // The directory read at start-up refuses it the same way, once it holds an adapter.
            std::fs::write(out.path().join(ADAPTER_CONFIG), "{}").unwrap();
            assert_eq!(scan(d.path()).unwrap_err().message, want);
            std::fs::remove_file(d.path().join("link")).unwrap();
        }
        assert!(resolve_in(d.path(), "missing")
            .unwrap_err()
            .message
            .contains("no adapter folder"));
    }
}
