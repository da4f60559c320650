//! The output folder of a run, written atomically: everything goes to a staging folder beside
//! the target, which is renamed into place only when complete. An interrupted run leaves the
//! target as it was (and at most a `.partial` folder, removed on the next clean exit).

use std::path::{Path, PathBuf};

use crate::{Result, TrainError};

/// Files of an adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const LABELS: &str = "labels.json";
pub const RUN_CONFIG: &str = "run_config.json";
pub const METRICS: &str = "metrics.jsonl";

/// A staging folder that becomes `target` on [`Staging::commit`] and is removed if dropped.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates the staging folder next to `target`; fails early (before any training) when the
    /// location is not writable.
    pub fn create(target: &Path) -> Result<Self> {
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| {
            TrainError::Io(format!(
                "cannot create the output folder's parent {}: {e}; choose a writable --output",
                parent.display()
            ))
        })?;
        let name = target
            .file_name()
            .ok_or_else(|| {
                TrainError::Io(format!(
                    "output path {} has no folder name",
                    target.display()
                ))
            })?
            .to_string_lossy()
            .to_string();
        remove_dead_partials(parent, &name);
        let dir = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir(&dir).map_err(|e| {
            TrainError::Io(format!(
                "output folder {} is not writable ({e}); choose a writable --output",
                target.display()
            ))
        })?;
        if target.exists() && !target.is_dir() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(TrainError::Io(format!(
                "output path {} exists and is not a folder",
                target.display()
            )));
        }
        Ok(Self {
            target: target.to_path_buf(),
            dir,
            committed: false,
        })
    }

    /// The staging folder (write here).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes one file into the staging folder.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        deltatune_core::write_atomic(&self.dir.join(name), bytes)?;
        Ok(())
    }

    /// Writes a value as pretty JSON.
    pub fn write_json<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let mut s = serde_json::to_string_pretty(value).expect("serialisable");
        s.push('\n');
        self.write(name, s.as_bytes())
    }

    /// Moves the finished folder into place, replacing an older one.
    pub fn commit(mut self) -> Result<PathBuf> {
        let old = self.target.with_file_name(format!(
            ".{}.old-{}",
            self.target.file_name().unwrap().to_string_lossy(),
            std::process::id()
        ));
        let had_old = self.target.exists();
        if had_old {
            std::fs::rename(&self.target, &old).map_err(|e| {
                TrainError::Io(format!(
                    "moving the previous {} aside: {e}",
                    self.target.display()
                ))
            })?;
        }
        if let Err(e) = std::fs::rename(&self.dir, &self.target) {
            if had_old {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(TrainError::Io(format!(
                "moving the output into {}: {e}",
                self.target.display()
            )));
        }
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

/// Removes the staging folders of `name` left by processes that no longer run (a run killed
/// with SIGKILL cannot clean up after itself).
fn remove_dead_partials(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && Path::new("/proc/self").exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_staging_leaves_nothing_and_commit_replaces() {
        let root = std::env::temp_dir().join(format!("dt-staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let out = root.join("adapter");
        {
            let s = Staging::create(&out).unwrap();
            s.write("a.txt", b"half").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "staging folder left behind"
        );
        let s = Staging::create(&out).unwrap();
        s.write("a.txt", b"one").unwrap();
        s.commit().unwrap();
        let s = Staging::create(&out).unwrap();
        s.write("b.txt", b"two").unwrap();
        s.commit().unwrap();
        assert!(!out.join("a.txt").exists());
        assert_eq!(std::fs::read(out.join("b.txt")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
