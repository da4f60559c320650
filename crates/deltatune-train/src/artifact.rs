//! The output folder of a run, written atomically: everything goes to a staging folder beside
//! the target, which is renamed into place only when complete. An interrupted run leaves the
//! target as it was (and at most a `.partial` folder, removed on the next clean exit).
//!
//! deltatune never removes or replaces what it did not write. An output folder is written only
//! when it is absent, empty, or one deltatune completed earlier (recognised by the owner file
//! [`OWNER_FILE`] it leaves in every folder it completes, which lists the files it wrote; for
//! folders written before that file existed, by `run_config.json` and deltatune's own file
//! names only). Replacing a completed folder needs `--overwrite`; a folder that is, contains or
//! lies inside an input of the same command is refused whatever the flags.

use std::path::{Component, Path, PathBuf};

use crate::{Result, TrainError};

/// Files of an adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const LABELS: &str = "labels.json";
pub const RUN_CONFIG: &str = "run_config.json";
pub const METRICS: &str = "metrics.jsonl";

/// The file deltatune writes into every output folder it completes: the names of the files it
/// wrote there. Its presence is how a later command knows the folder is deltatune's to replace.
pub const OWNER_FILE: &str = ".deltatune-output.json";

/// Names deltatune writes into output folders after they are complete (auto's report and
/// summary), and the names it wrote before [`OWNER_FILE`] existed.
const KNOWN_NAMES: &[&str] = &[
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LABELS,
    RUN_CONFIG,
    METRICS,
    "results.json",
    "test_generations.jsonl",
    "subspace.safetensors",
    "data.json",
    "combination.json",
    "auto.json",
    "auto-report.html",
];

/// What a command writes into and what it reads, for the checks of [`check_output_folder`] and
/// [`check_output_file`].
#[derive(Debug, Clone, Default)]
pub struct OutputRules {
    /// How the output is named to the user (`--output`, `--table`...).
    pub flag: String,
    /// Replace a folder or file deltatune wrote earlier (`--overwrite`).
    pub overwrite: bool,
    /// The command's inputs: what they are (`--adapter`, `data.train`) and where.
    pub inputs: Vec<(String, PathBuf)>,
}

impl OutputRules {
    /// Rules for an output named by `flag`.
    pub fn new(flag: &str, overwrite: bool) -> Self {
        Self {
            flag: flag.to_string(),
            overwrite,
            inputs: Vec::new(),
        }
    }

    /// Adds an input of the command.
    pub fn input(mut self, what: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.inputs.push((what.into(), path.into()));
        self
    }
}

/// `path` made absolute with symlinks and `..` resolved as far as it exists: the longest
/// existing ancestor is canonicalised and the rest appended (and normalised lexically).
pub fn resolve_path(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                match Path::new(part).components().next() {
                    Some(Component::ParentDir) => {
                        out.pop();
                    }
                    Some(Component::CurDir) | None => {}
                    _ => out.push(part),
                }
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => {
                // `..` or `.` at the end: drop it lexically and go on.
                let last = existing.components().next_back();
                match (last, existing.parent()) {
                    (Some(c), Some(parent)) => {
                        rest.push(c.as_os_str().to_os_string());
                        existing = parent.to_path_buf();
                    }
                    _ => return abs,
                }
            }
        }
    }
}

/// What an existing output location holds.
#[derive(Debug, Clone, PartialEq)]
pub enum FolderState {
    Absent,
    NotFolder,
    Empty,
    /// A folder deltatune completed; the files it lists.
    Ours(Vec<String>),
    /// A folder holding entries deltatune did not write (some of them, sorted).
    Foreign(Vec<String>),
}

/// Reads what `dir` holds and whether deltatune wrote all of it.
pub fn folder_state(dir: &Path) -> FolderState {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(_) => return FolderState::Absent,
    };
    if !meta.is_dir() {
        return FolderState::NotFolder;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return FolderState::Foreign(vec!["(unreadable folder)".into()]);
    };
    let mut names: Vec<(String, bool)> = rd
        .flatten()
        .map(|e| {
            let is_file = e.file_type().is_ok_and(|t| t.is_file());
            (e.file_name().to_string_lossy().into_owned(), is_file)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return FolderState::Empty;
    }
    let listed: Option<Vec<String>> = std::fs::read(dir.join(OWNER_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["files"].as_array().map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
        });
    let legacy = listed.is_none() && names.iter().any(|(n, f)| n == RUN_CONFIG && *f);
    if listed.is_none() && !legacy {
        return FolderState::Foreign(names.into_iter().map(|(n, _)| n).collect());
    }
    let listed = listed.unwrap_or_default();
    let foreign: Vec<String> = names
        .iter()
        .filter(|(n, is_file)| {
            !(*is_file
                && (n == OWNER_FILE
                    || listed.iter().any(|l| l == n)
                    || KNOWN_NAMES.contains(&n.as_str())))
        })
        .map(|(n, _)| n.clone())
        .collect();
    if foreign.is_empty() {
        FolderState::Ours(names.into_iter().map(|(n, _)| n).collect())
    } else {
        FolderState::Foreign(foreign)
    }
}

/// The first three names, and how many more (for messages).
pub fn some_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Refuses an output that is, contains or lies inside one of the inputs, or the current folder.
fn check_overlap(target: &Path, rules: &OutputRules, folder: bool) -> Result<()> {
    let t = resolve_path(target);
    let flag = &rules.flag;
    if folder {
        if let Ok(cwd) = std::env::current_dir() {
            let cwd = resolve_path(&cwd);
            if cwd.starts_with(&t) {
                return Err(TrainError::Io(format!(
                    "{flag} {} {} the current folder: deltatune writes a new folder in its \
                     place: choose a folder below it (e.g. {}/run)",
                    target.display(),
                    if cwd == t { "is" } else { "lies above" },
                    target.display()
                )));
            }
        }
    }
    for (what, input) in &rules.inputs {
        let i = resolve_path(input);
        let relation = if i == t {
            "is"
        } else if i.starts_with(&t) {
            "contains"
        } else if t.starts_with(&i) {
            "lies inside"
        } else {
            continue;
        };
        return Err(TrainError::Io(format!(
            "{flag} {} {relation} {what} {}, which this command reads; writing there could \
             destroy it: choose another {flag}",
            target.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Checks, before any work, that a command may write the folder `target`: absent, empty, or one
/// deltatune completed (with `--overwrite`), and none of the command's inputs.
pub fn check_output_folder(target: &Path, rules: &OutputRules) -> Result<()> {
    check_overlap(target, rules, true)?;
    let flag = &rules.flag;
    match folder_state(target) {
        FolderState::Absent | FolderState::Empty => Ok(()),
        FolderState::NotFolder => Err(TrainError::Io(format!(
            "{flag} {} exists and is not a folder; choose another {flag}",
            target.display()
        ))),
        FolderState::Ours(names) => {
            if rules.overwrite {
                Ok(())
            } else {
                Err(TrainError::Io(format!(
                    "{flag} {} holds the finished output of an earlier deltatune run ({}); pass \
                     --overwrite to replace it, or choose another {flag}",
                    target.display(),
                    some_names(&names)
                )))
            }
        }
        FolderState::Foreign(names) => Err(TrainError::Io(format!(
            "{flag} {} holds files deltatune did not write ({}); deltatune writes only into a \
             folder that is absent, empty or its own earlier output, so nothing of yours is \
             replaced (--overwrite does not change that): choose another {flag}",
            target.display(),
            some_names(&names)
        ))),
    }
}

/// The comment deltatune puts at the top of the text files it writes (reports, tables), so a
/// later run knows it may replace them.
pub const FILE_MARK: &str = "written by deltatune";

/// Checks, before any work, that a command may write the file `target`: absent, or one
/// deltatune wrote (its first kilobyte holds [`FILE_MARK`]) with `--overwrite`... or without it
/// when `replace_own` (reports that are rewritten as a matter of course); a file deltatune did
/// not write needs `--overwrite`. Never a folder, and none of the command's inputs.
pub fn check_output_file(target: &Path, rules: &OutputRules, replace_own: bool) -> Result<()> {
    check_overlap(target, rules, false)?;
    let flag = &rules.flag;
    let meta = match std::fs::metadata(target) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if meta.is_dir() {
        return Err(TrainError::Io(format!(
            "{flag} {} is a folder; give a file name (e.g. {}/report.html)",
            target.display(),
            target.display()
        )));
    }
    let ours = {
        use std::io::Read;
        let mut head = Vec::new();
        std::fs::File::open(target)
            .and_then(|f| f.take(1024).read_to_end(&mut head))
            .is_ok()
            && String::from_utf8_lossy(&head).contains(FILE_MARK)
    };
    if rules.overwrite || (ours && replace_own) {
        return Ok(());
    }
    Err(TrainError::Io(format!(
        "{flag} {} exists{}; pass --overwrite to replace it, or choose another {flag}",
        target.display(),
        if ours {
            " (written by an earlier deltatune run)"
        } else {
            " and deltatune did not write it"
        }
    )))
}

/// A staging folder that becomes `target` on [`Staging::commit`] and is removed if dropped.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    dir: PathBuf,
    overwrite: bool,
    flag: String,
    committed: bool,
}

impl Staging {
    /// Checks `target` against `rules` ([`check_output_folder`]), then creates the staging
    /// folder next to it; fails early (before any training) when the location is not writable.
    pub fn create(target: &Path, rules: &OutputRules) -> Result<Self> {
        check_output_folder(target, rules)?;
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| {
            TrainError::Io(format!(
                "cannot create the output folder's parent {}: {e}; choose a writable {}",
                parent.display(),
                rules.flag
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
        if folder_state(&dir) != FolderState::Absent {
            return Err(TrainError::Io(format!(
                "{} exists (another deltatune process with this process id?); remove it or \
                 choose another {}",
                dir.display(),
                rules.flag
            )));
        }
        std::fs::create_dir(&dir).map_err(|e| {
            TrainError::Io(format!(
                "output folder {} is not writable ({e}); choose a writable {}",
                target.display(),
                rules.flag
            ))
        })?;
        Ok(Self {
            target: target.to_path_buf(),
            dir,
            overwrite: rules.overwrite,
            flag: rules.flag.clone(),
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

    /// Moves the finished folder into place. An earlier output of deltatune's is replaced (the
    /// rules allowed it when the staging folder was created), and only its own files are
    /// removed; anything else found at the target now (written there during the run) stops the
    /// commit, and the result is kept beside it under a name the error gives.
    pub fn commit(mut self) -> Result<PathBuf> {
        let mut files: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| TrainError::Io(format!("reading {}: {e}", self.dir.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        self.write_json(
            OWNER_FILE,
            &serde_json::json!({
                "written_by": format!("deltatune {}", env!("CARGO_PKG_VERSION")),
                "files": files,
            }),
        )?;
        let name = self
            .target
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let old = self
            .target
            .with_file_name(format!(".{name}.old-{}", std::process::id()));
        let state = folder_state(&self.target);
        let refuse = match &state {
            FolderState::Absent => None,
            FolderState::Empty => {
                // Only an empty folder goes (remove_dir refuses anything else).
                let _ = std::fs::remove_dir(&self.target);
                None
            }
            FolderState::Ours(_) if self.overwrite => None,
            FolderState::Ours(names) => Some(format!(
                "it now holds the output of another deltatune run ({}) and --overwrite was not \
                 given",
                some_names(names)
            )),
            FolderState::NotFolder => Some("it is now a file".to_string()),
            FolderState::Foreign(names) => Some(format!(
                "files deltatune did not write appeared in it during the run ({})",
                some_names(names)
            )),
        };
        if let Some(why) = refuse {
            let kept = (0..1000)
                .map(|i| {
                    self.target.with_file_name(if i == 0 {
                        format!("{name}.new")
                    } else {
                        format!("{name}.new{i}")
                    })
                })
                .find(|p| !p.exists())
                .unwrap_or_else(|| self.dir.clone());
            let kept = if std::fs::rename(&self.dir, &kept).is_ok() {
                kept
            } else {
                self.dir.clone()
            };
            self.committed = true;
            return Err(TrainError::Io(format!(
                "not writing {} {}: {why}; nothing there was changed, and this run's output is \
                 in {}",
                self.flag,
                self.target.display(),
                kept.display()
            )));
        }
        let had_old = matches!(state, FolderState::Ours(_));
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
        self.committed = true;
        if had_old {
            remove_own_files(&old);
        }
        Ok(self.target.clone())
    }
}

/// Removes a folder deltatune completed: the files it lists and deltatune's own names, then
/// the folder if that left it empty. Anything else stays (with a warning).
fn remove_own_files(dir: &Path) {
    if let FolderState::Ours(names) = folder_state(dir) {
        for n in names {
            let _ = std::fs::remove_file(dir.join(n));
        }
    }
    if std::fs::remove_dir(dir).is_err() && dir.exists() {
        eprintln!(
            "warning: left {}: the previous output, which now holds files deltatune did not \
             write",
            dir.display()
        );
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
        if !alive && Path::new("/proc/self").exists() && e.file_type().is_ok_and(|t| t.is_dir()) {
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

    fn rules() -> OutputRules {
        OutputRules::new("--output", false)
    }

    fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn dropped_staging_leaves_nothing_and_commit_replaces_only_with_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("adapter");
        {
            let s = Staging::create(&out, &rules()).unwrap();
            s.write("a.txt", b"half").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "staging folder left behind"
        );
        let s = Staging::create(&out, &rules()).unwrap();
        s.write("a.txt", b"one").unwrap();
        s.commit().unwrap();
        assert!(matches!(folder_state(&out), FolderState::Ours(_)));
        // A finished output is replaced only with --overwrite.
        let e = Staging::create(&out, &rules()).unwrap_err().to_string();
        assert!(e.contains("pass --overwrite"), "{e}");
        let s = Staging::create(&out, &OutputRules::new("--output", true)).unwrap();
        s.write("b.txt", b"two").unwrap();
        s.commit().unwrap();
        assert!(!out.join("a.txt").exists());
        assert_eq!(std::fs::read(out.join("b.txt")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_folder_with_files_deltatune_did_not_write_is_refused_even_with_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("mine");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), b"my notes").unwrap();
        std::fs::write(out.join(ADAPTER_CONFIG), b"{}").unwrap();
        let before = tree(&out);
        for overwrite in [false, true] {
            let e = Staging::create(&out, &OutputRules::new("--output", overwrite))
                .unwrap_err()
                .to_string();
            assert!(e.contains("holds files deltatune did not write"), "{e}");
            assert!(e.contains("notes.txt"), "{e}");
        }
        assert_eq!(tree(&out), before);
        // A deltatune output that a user added a file to is no longer deltatune's.
        let ours = root.path().join("ours");
        let s = Staging::create(&ours, &rules()).unwrap();
        s.write(ADAPTER_CONFIG, b"{}").unwrap();
        s.commit().unwrap();
        std::fs::write(ours.join("README.md"), b"mine").unwrap();
        let e = Staging::create(&ours, &OutputRules::new("--output", true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("README.md"), "{e}");
        // An empty folder is fine.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let s = Staging::create(&empty, &rules()).unwrap();
        s.write("x", b"1").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(empty.join("x")).unwrap(), b"1");
    }

    #[test]
    fn files_appearing_during_the_run_stop_the_commit_and_keep_the_result() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        let s = Staging::create(&out, &OutputRules::new("--output", true)).unwrap();
        s.write(ADAPTER_CONFIG, b"{\"r\": 8}").unwrap();
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("data.csv"), b"text,label\n").unwrap();
        let e = s.commit().unwrap_err().to_string();
        assert!(e.contains("data.csv") && e.contains("run.new"), "{e}");
        assert_eq!(
            std::fs::read(out.join("data.csv")).unwrap(),
            b"text,label\n"
        );
        assert_eq!(
            std::fs::read(root.path().join("run.new").join(ADAPTER_CONFIG)).unwrap(),
            b"{\"r\": 8}"
        );
    }

    #[test]
    fn an_output_that_is_contains_or_lies_inside_an_input_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("imgs");
        std::fs::create_dir_all(data.join("train/cat")).unwrap();
        let file = data.join("train.csv");
        std::fs::write(&file, b"x").unwrap();
        let cases = [
            (data.clone(), "is"),
            (root.path().to_path_buf(), "contains"),
            (data.join("train/run"), "lies inside"),
            // The same folder spelled another way.
            (data.join("train/../../imgs"), "is"),
        ];
        for (out, relation) in cases {
            let r = rules().input("data.train", &data);
            let e = check_output_folder(&out, &r).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{relation} data.train")),
                "{}: {e}",
                out.display()
            );
        }
        let r = rules().input("data.train", &file);
        let e = check_output_folder(&data, &r).unwrap_err().to_string();
        assert!(e.contains("contains data.train"), "{e}");
        assert!(data.join("train/cat").is_dir() && file.is_file());
    }

    #[test]
    fn output_files_are_replaced_only_when_deltatune_wrote_them_or_with_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("report.html");
        let r = OutputRules::new("--report", false);
        check_output_file(&f, &r, true).unwrap();
        std::fs::write(&f, b"<html>mine</html>").unwrap();
        let e = check_output_file(&f, &r, true).unwrap_err().to_string();
        assert!(e.contains("deltatune did not write it"), "{e}");
        check_output_file(&f, &OutputRules::new("--report", true), true).unwrap();
        std::fs::write(&f, format!("<!-- {FILE_MARK} -->\n<html></html>")).unwrap();
        check_output_file(&f, &r, true).unwrap();
        let e = check_output_file(&f, &r, false).unwrap_err().to_string();
        assert!(e.contains("earlier deltatune run"), "{e}");
        let e = check_output_file(root.path(), &r, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a folder"), "{e}");
    }

    #[test]
    fn resolve_path_handles_missing_parts_and_dots() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().canonicalize().unwrap();
        assert_eq!(
            resolve_path(&root.path().join("a/b/../c")),
            base.join("a/c")
        );
        assert_eq!(resolve_path(&root.path().join("a/./b")), base.join("a/b"));
        assert_eq!(resolve_path(root.path()), base);
    }
}
