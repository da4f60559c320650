//! Image classification data: image sets, the folder layout, preprocessing
//! and batching (with prefetching in parallel with training).
//!
//! * [`ImageSet`]: examples of one split; each is an [`ImageSource`] (grey
//!   bytes in memory, as read from IDX files, or an image file) and a label.
//!   [`ImageSplits`] holds train and the optional dev and test sets with the
//!   class names.
//! * [`load_image_folder`]: `root/train/<class>/*.{png,jpg,jpeg}`, with
//!   optional `root/dev/` and `root/test/` of the same classes. Class names are
//!   the folder names, sorted; files within a class are sorted by name.
//! * [`Preprocess`]: decode, resize, optional augmentation, rescale to
//!   `[0, 1]` and normalise, giving `f32` CHW pixels. See its docs for the
//!   exact geometry.
//! * [`Batcher`] builds `[B, C, H, W]` tensors on the CPU;
//!   [`Batcher::prefetch`] prepares the next batches in worker threads while
//!   the current one trains, yielding them in order.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use crate::error::list_names;
use crate::{DataError, Result};

/// ImageNet's per-channel mean (RGB), the default normalisation.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The grey equivalents of [`IMAGENET_MEAN`] and [`IMAGENET_STD`] (ITU-R 601
/// luma weights 0.299, 0.587, 0.114), the default for 1-channel models.
pub const IMAGENET_GREY_MEAN: f32 = 0.449;
/// See [`IMAGENET_GREY_MEAN`].
pub const IMAGENET_GREY_STD: f32 = 0.226;
/// The default square side of preprocessed images.
pub const DEFAULT_IMAGE_SIZE: usize = 224;
/// File extensions read from image folders (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
/// The split folder names of the folder layout.
pub const SPLIT_NAMES: [&str; 3] = ["train", "dev", "test"];

/// Where an example's pixels come from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// Greyscale bytes (`width * height`, row-major) at `offset` in a buffer
    /// shared by many examples (IDX files).
    Memory {
        /// The shared buffer.
        pixels: Arc<[u8]>,
        /// Start of this image in `pixels`.
        offset: usize,
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },
    /// A PNG or JPEG file, decoded when the image is used.
    File(PathBuf),
}

impl ImageSource {
    /// The pixels: greyscale stays 1 channel; colour becomes RGB (alpha is
    /// dropped). A file that does not decode is an error naming it.
    pub fn load(&self) -> Result<Pixels<'_>> {
        match self {
            ImageSource::Memory {
                pixels,
                offset,
                width,
                height,
            } => {
                let n = width * height;
                let data =
                    pixels
                        .get(*offset..offset + n)
                        .ok_or_else(|| DataError::ImageDecode {
                            path: PathBuf::from("<memory>"),
                            message: format!(
                                "bytes {offset}..{} are outside the {}-byte buffer",
                                offset + n,
                                pixels.len()
                            ),
                        })?;
                Ok(Pixels {
                    width: *width,
                    height: *height,
                    channels: 1,
                    data: Cow::Borrowed(data),
                })
            }
            ImageSource::File(path) => decode_file(path),
        }
    }

    /// The file, for file sources.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ImageSource::File(p) => Some(p),
            ImageSource::Memory { .. } => None,
        }
    }
}

/// Decoded 8-bit pixels, interleaved (`HWC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels<'a> {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// `height * width * channels` bytes.
    pub data: Cow<'a, [u8]>,
}

fn decode_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::ImageDecode {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A file that cannot be opened: missing (moved or deleted since the folder was listed) or
/// unreadable, not damaged.
fn open_err(path: &Path, e: std::io::Error) -> DataError {
    if e.kind() == std::io::ErrorKind::NotFound {
        DataError::FileNotFound {
            path: path.to_path_buf(),
        }
    } else {
        DataError::io("open", path, e)
    }
}

/// Decodes a PNG or JPEG file (the format is guessed from the content).
pub fn decode_file(path: &Path) -> Result<Pixels<'static>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| open_err(path, e))?
        .with_guessed_format()
        .map_err(|e| decode_err(path, e))?
        .decode()
        .map_err(|e| decode_err(path, e))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(decode_err(path, format!("the image is {width}x{height}")));
    }
    Ok(if img.color().has_color() {
        Pixels {
            width,
            height,
            channels: 3,
            data: Cow::Owned(img.into_rgb8().into_raw()),
        }
    } else {
        Pixels {
            width,
            height,
            channels: 1,
            data: Cow::Owned(img.into_luma8().into_raw()),
        }
    })
}

/// Reads only the header of an image file: its channels (1 grey, 3 colour).
fn probe_channels(path: &Path) -> Result<usize> {
    use image::ImageDecoder;
    let dec = image::ImageReader::open(path)
        .map_err(|e| open_err(path, e))?
        .with_guessed_format()
        .map_err(|e| decode_err(path, e))?
        .into_decoder()
        .map_err(|e| decode_err(path, e))?;
    let (w, h) = dec.dimensions();
    if w == 0 || h == 0 {
        return Err(decode_err(path, format!("the image is {w}x{h}")));
    }
    Ok(if dec.color_type().has_color() { 3 } else { 1 })
}

/// One example: where its pixels are and its class id.
#[derive(Debug, Clone)]
pub struct ImageExample {
    /// The pixels.
    pub source: ImageSource,
    /// Index into the class names.
    pub label: usize,
}

/// The examples of one split.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// `train`, `dev` or `test`.
    pub split: String,
    /// Where the set came from (a split folder, or the IDX images file), for messages.
    pub origin: PathBuf,
    /// The class names; labels index them.
    pub classes: Arc<[String]>,
    /// Channels of the images: 1 when every image is greyscale, else 3.
    pub channels: usize,
    /// The examples, in a deterministic order.
    pub examples: Vec<ImageExample>,
}

impl ImageSet {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether the set has no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Number of examples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for e in &self.examples {
            c[e.label] += 1;
        }
        c
    }

    /// Which examples the set holds, as JSON another program can read the same examples from:
    /// `{"split", "labels": [...], "idx_images": FILE, "indices": [...]}` when every example is
    /// an image of one IDX file (its index in that file), else `{"split", "labels", "files":
    /// [...]}`. Labels index [`ImageSet::classes`]. Written into a run's output folder so a
    /// reference run (PyTorch) trains and tests on exactly these images.
    pub fn manifest(&self) -> serde_json::Value {
        let labels: Vec<usize> = self.examples.iter().map(|e| e.label).collect();
        let indices: Option<Vec<usize>> = self
            .examples
            .iter()
            .map(|e| match &e.source {
                ImageSource::Memory {
                    offset,
                    width,
                    height,
                    ..
                } if width * height > 0 && offset % (width * height) == 0 => {
                    Some(offset / (width * height))
                }
                _ => None,
            })
            .collect();
        match indices {
            Some(indices) if !self.examples.is_empty() => serde_json::json!({
                "split": self.split,
                "labels": labels,
                "idx_images": self.origin,
                "indices": indices,
            }),
            _ => serde_json::json!({
                "split": self.split,
                "labels": labels,
                "files": self
                    .examples
                    .iter()
                    .map(|e| e.source.path().map(Path::to_path_buf))
                    .collect::<Vec<_>>(),
            }),
        }
    }

    /// The set's description for messages: "split `train` (`origin`)".
    pub fn describe(&self) -> String {
        format!("split `{}` (`{}`)", self.split, self.origin.display())
    }
}

/// Train and the optional dev and test sets with their class names.
#[derive(Debug, Clone)]
pub struct ImageSplits {
    /// The class names, shared by every set.
    pub classes: Arc<[String]>,
    /// Training examples.
    pub train: ImageSet,
    /// Validation examples, if any.
    pub dev: Option<ImageSet>,
    /// Test examples, if any.
    pub test: Option<ImageSet>,
}

fn folder_err(path: &Path, problem: impl Into<String>, fix: impl Into<String>) -> DataError {
    DataError::ImageFolder {
        path: path.to_path_buf(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

const LAYOUT: &str = "lay the images out as ROOT/train/<class>/*.png|jpg|jpeg (ROOT/dev/ and ROOT/test/ optional, with the same class folders)";

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

fn is_image_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Sorted (name, path, is_dir) of the visible entries of `dir`.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io("read directory", dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| DataError::io("read directory", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_hidden(&name) {
            continue;
        }
        let path = e.path();
        // Follow symbolic links.
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// One split folder: class names and, per class, its image files.
fn read_split_folder(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut classes = Vec::new();
    for (name, path, is_dir) in list_dir(dir)? {
        if !is_dir {
            if is_image_name(&name) {
                return Err(folder_err(
                    &path,
                    "the image lies directly in the split folder, outside any class folder",
                    format!("move it into its class folder: {LAYOUT}"),
                ));
            }
            continue;
        }
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        for (fname, fpath, fdir) in list_dir(&path)? {
            if !fdir && is_image_name(&fname) {
                files.push(fpath);
            } else {
                skipped.push(fname);
            }
        }
        if files.is_empty() {
            let other = if skipped.is_empty() {
                "it is empty".to_string()
            } else {
                format!(
                    "it holds no .png/.jpg/.jpeg file ({} other entries skipped, e.g. `{}`; subfolders are not searched)",
                    skipped.len(),
                    skipped[0]
                )
            };
            return Err(folder_err(
                &path,
                format!("class folder `{name}` has no images: {other}"),
                "put at least one image of the class in it, or remove the folder if the class is not wanted",
            ));
        }
        classes.push((name, files));
    }
    if classes.is_empty() {
        return Err(folder_err(
            dir,
            "the split folder has no class folders",
            LAYOUT,
        ));
    }
    Ok(classes)
}

/// Loads the folder layout `root/{train,dev,test}/<class>/*.{png,jpg,jpeg}`
/// (dev and test optional). Class names are the train folder's subfolder
/// names, sorted; dev and test must have exactly the same class folders.
/// Hidden entries (names starting with `.`) and files with other extensions
/// are skipped; a class folder without images is an error. Every image's
/// header is read (so a file that is not an image is an error naming it here)
/// to find the channels: 1 when every image of every split is greyscale,
/// else 3 (greyscale images are then repeated into RGB).
pub fn load_image_folder(root: &Path) -> Result<ImageSplits> {
    if !root.is_dir() {
        return Err(folder_err(
            root,
            "the folder does not exist",
            format!("check the path; {LAYOUT}"),
        ));
    }
    let train_dir = root.join("train");
    if !train_dir.is_dir() {
        let found: Vec<String> = list_dir(root)?
            .into_iter()
            .filter(|e| e.2)
            .map(|e| e.0)
            .collect();
        return Err(folder_err(
            root,
            format!("no `train` folder (subfolders: [{}])", list_names(&found)),
            LAYOUT,
        ));
    }
    let train = read_split_folder(&train_dir)?;
    let class_names: Vec<String> = train.iter().map(|c| c.0.clone()).collect();
    let mut layouts = vec![("train", train_dir, train)];
    for split in ["dev", "test"] {
        let dir = root.join(split);
        if !dir.is_dir() {
            continue;
        }
        let classes = read_split_folder(&dir)?;
        let names: Vec<String> = classes.iter().map(|c| c.0.clone()).collect();
        if names != class_names {
            let missing: Vec<&String> = class_names.iter().filter(|c| !names.contains(c)).collect();
            let extra: Vec<&String> = names.iter().filter(|c| !class_names.contains(c)).collect();
            return Err(folder_err(
                &dir,
                format!(
                    "its class folders differ from train's: missing [{}], not in train [{}]",
                    list_names(&missing),
                    list_names(&extra)
                ),
                "every split must have the same class folders, each with at least one image: add the missing ones, and rename or remove the others (or add them to train)",
            ));
        }
        layouts.push((split, dir, classes));
    }
    let classes: Arc<[String]> = class_names.into();
    let mut channels = 1;
    let mut sets = Vec::new();
    for (split, dir, per_class) in layouts {
        let mut examples = Vec::new();
        for (label, (_, files)) in per_class.into_iter().enumerate() {
            for f in files {
                if channels == 1 {
                    channels = probe_channels(&f)?;
                } else {
                    probe_channels(&f)?;
                }
                examples.push(ImageExample {
                    source: ImageSource::File(f),
                    label,
                });
            }
        }
        sets.push(ImageSet {
            split: split.to_string(),
            origin: dir,
            classes: classes.clone(),
            channels: 0,
            examples,
        });
    }
    for s in &mut sets {
        s.channels = channels;
    }
    let mut it = sets.into_iter();
    let train = it.next().expect("train is always loaded");
    let (mut dev, mut test) = (None, None);
    for s in it {
        if s.split == "dev" {
            dev = Some(s);
        } else {
            test = Some(s);
        }
    }
    Ok(ImageSplits {
        classes,
        train,
        dev,
        test,
    })
}

/// The resampling filter (Pillow's definitions, which transformers' image
/// processors use; antialiased when shrinking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeFilter {
    /// Triangle filter, support 1 (Pillow `BILINEAR`, code 2).
    Bilinear,
    /// Cubic convolution with a = -0.5, support 2 (Pillow `BICUBIC`, code 3).
    Bicubic,
}

impl ResizeFilter {
    /// The filter of a Pillow resample code (`resample` in a Hugging Face
    /// `preprocessor_config.json`): 2 bilinear, 3 bicubic.
    pub fn from_pil_code(code: i64) -> Option<ResizeFilter> {
        match code {
            2 => Some(ResizeFilter::Bilinear),
            3 => Some(ResizeFilter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            ResizeFilter::Bilinear => 1.0,
            ResizeFilter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            ResizeFilter::Bilinear => (1.0 - x).max(0.0),
            ResizeFilter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// How images are brought to the model's square size: a resize, then a
/// centre crop of `size x size` (offsets `(resized - size) / 2`, rounded down,
/// as transformers' `center_crop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Resize the shorter side to this many pixels keeping the aspect ratio
    /// (the longer side becomes `floor(n * long / short)`, as transformers'
    /// `shortest_edge`), then crop the centre (e.g. Dinov2: 256 then 224).
    ShortestEdge(usize),
    /// Stretch to `n x n` whatever the aspect ratio, then crop the centre
    /// (transformers' `{"height": n, "width": n}` sizes; ViT: 224 without crop).
    Exact(usize),
}

/// Training-time augmentation, drawn from a generator seeded by
/// `(seed, epoch, example index)`, so an example gets the same augmentation in
/// the same epoch whatever the batch order or thread count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Probability of a horizontal flip.
    pub hflip_prob: f32,
    /// Random resized crop (torchvision's `RandomResizedCrop`): the area of
    /// the crop as a fraction of the image, drawn uniformly from this range,
    /// with the aspect ratio drawn log-uniformly from `crop_ratio`; the crop is
    /// then resized to `size x size` (replacing [`Preprocess::resize`]).
    /// `None`: no crop.
    pub crop_scale: Option<(f32, f32)>,
    /// Aspect ratio (width / height) range of the random crop.
    pub crop_ratio: (f32, f32),
}

impl Default for Augment {
    /// Flip with probability 0.5, crops of 8% to 100% of the area, ratios 3/4 to 4/3
    /// (torchvision's defaults).
    fn default() -> Self {
        Augment {
            hflip_prob: 0.5,
            crop_scale: Some((0.08, 1.0)),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

/// From pixels to the model's input: `f32` CHW of `channels x size x size`.
///
/// Steps: (1) the source box: the whole image, or with [`Augment::crop_scale`]
/// a random crop; (2) resampling to the output grid with [`ResizeFilter`],
/// separable, horizontal pass then vertical, each rounded and clamped to 8
/// bits as Pillow does (so values match transformers' Pillow-based
/// processors to within a grey level); the filter window is clipped to the
/// source box (edge pixels repeat); (3) the [`Resize`] centre crop (without
/// a random crop); (4) an optional horizontal flip; (5) `x * rescale`, then
/// `(x - mean[c]) / std[c]`. Greyscale images feed an RGB model by repeating
/// the grey plane (each channel normalised with its own mean and std);
/// colour images cannot feed a greyscale model ([`Preprocess::check_set`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Side of the square output.
    pub size: usize,
    /// How the image is brought to `size`.
    pub resize: Resize,
    /// The resampling filter.
    pub filter: ResizeFilter,
    /// Multiplier taking bytes to `[0, 1]` (1/255).
    pub rescale: f32,
    /// Per-channel mean, `channels` values.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, `channels` values.
    pub std: Vec<f32>,
    /// The model's input channels: 1 or 3.
    pub channels: usize,
    /// Training-time augmentation (`None` for evaluation).
    pub augment: Option<Augment>,
    /// Seed of the augmentation.
    pub seed: u64,
}

impl Preprocess {
    /// Defaults for a model taking `channels` (1 or 3) channels: 224x224,
    /// shorter side to 224 then centre crop, bilinear, ImageNet mean/std
    /// ([`IMAGENET_GREY_MEAN`]/[`IMAGENET_GREY_STD`] for 1 channel), no
    /// augmentation. Use [`Preprocess::from_hf_config`] for a checkpoint's own
    /// settings.
    pub fn for_model(channels: usize) -> Result<Self> {
        let (mean, std) = match channels {
            3 => (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec()),
            1 => (vec![IMAGENET_GREY_MEAN], vec![IMAGENET_GREY_STD]),
            c => {
                return Err(DataError::Preprocess {
                    origin: "the model".into(),
                    problem: format!("the model takes {c} input channels"),
                    fix: "only 1 (greyscale) and 3 (RGB) channel models are supported".into(),
                })
            }
        };
        Ok(Preprocess {
            size: DEFAULT_IMAGE_SIZE,
            resize: Resize::ShortestEdge(DEFAULT_IMAGE_SIZE),
            filter: ResizeFilter::Bilinear,
            rescale: 1.0 / 255.0,
            mean,
            std,
            channels,
            augment: None,
            seed: 0,
        })
    }

    /// The same with output side `size` (the shorter side resized to `size`
    /// when the mode is [`Resize::ShortestEdge`]).
    pub fn with_size(mut self, size: usize) -> Self {
        self.size = size;
        self.resize = match self.resize {
            Resize::ShortestEdge(_) => Resize::ShortestEdge(size),
            Resize::Exact(_) => Resize::Exact(size),
        };
        self
    }

    /// The same with augmentation `augment` seeded by `seed`.
    pub fn with_augment(mut self, augment: Option<Augment>, seed: u64) -> Self {
        self.augment = augment;
        self.seed = seed;
        self
    }

    /// Reads a Hugging Face `preprocessor_config.json` for a model taking
    /// `model_channels` channels (the model config's `num_channels`): keys
    /// `do_resize`, `size` (`{"shortest_edge"}`, `{"height", "width"}` square, or
    /// a number), `do_center_crop`, `crop_size`, `resample` (2 bilinear, 3
    /// bicubic), `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`,
    /// `image_std`. A mean/std with a different number of values than the
    /// model's channels (an RGB normalisation for a greyscale checkpoint or the
    /// reverse) is an error naming the file and key.
    pub fn from_hf_config(path: &Path, model_channels: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io("read", path, e))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| DataError::Preprocess {
                origin: format!("`{}`", path.display()),
                problem: format!("not valid JSON: {e}"),
                fix: "fix the file or pass the checkpoint's own preprocessor_config.json".into(),
            })?;
        Self::from_hf_json(&v, &format!("`{}`", path.display()), model_channels)
    }

    /// [`Preprocess::from_hf_config`] on a parsed JSON object; `origin` names it in errors.
    pub fn from_hf_json(
        v: &serde_json::Value,
        origin: &str,
        model_channels: usize,
    ) -> Result<Self> {
        let mut p = Preprocess::for_model(model_channels)?;
        let err = |key: &str, problem: String, fix: &str| DataError::Preprocess {
            origin: format!("{origin} key `{key}`"),
            problem,
            fix: fix.to_string(),
        };
        let flag = |key: &str| v.get(key).and_then(|x| x.as_bool()).unwrap_or(true);
        let side = |key: &str, x: &serde_json::Value| -> Result<(Option<usize>, Option<usize>)> {
            // (shortest_edge, square side)
            let n = |y: &serde_json::Value| y.as_u64().filter(|&n| n > 0).map(|n| n as usize);
            if let Some(s) = n(x) {
                return Ok((None, Some(s)));
            }
            if let Some(s) = x.get("shortest_edge").and_then(n) {
                return Ok((Some(s), None));
            }
            match (x.get("height").and_then(n), x.get("width").and_then(n)) {
                (Some(h), Some(w)) if h == w => Ok((None, Some(h))),
                (Some(h), Some(w)) => Err(err(
                    key,
                    format!("a {w}x{h} (width x height) size; only square inputs are supported"),
                    "use a checkpoint with square inputs",
                )),
                _ => Err(err(
                    key,
                    format!("unsupported value {x}"),
                    "expected a number, {\"shortest_edge\": N} or {\"height\": N, \"width\": N}",
                )),
            }
        };
        let do_crop = v
            .get("do_center_crop")
            .and_then(|x| x.as_bool())
            .unwrap_or(v.get("crop_size").is_some());
        let crop = match (do_crop, v.get("crop_size")) {
            (true, Some(c)) => match side("crop_size", c)? {
                (None, Some(sq)) => Some(sq),
                _ => {
                    return Err(err(
                        "crop_size",
                        format!("unsupported value {c}"),
                        "expected a number or {\"height\": N, \"width\": N}",
                    ))
                }
            },
            _ => None,
        };
        if flag("do_resize") {
            if let Some(s) = v.get("size") {
                // Outputs are square: without a crop, a shortest-edge resize
                // keeps the centre square of the short side.
                p.resize = match side("size", s)? {
                    (Some(short), _) => Resize::ShortestEdge(short),
                    (None, Some(sq)) => Resize::Exact(sq),
                    (None, None) => unreachable!("side returns one of the two"),
                };
                let (Resize::ShortestEdge(n) | Resize::Exact(n)) = p.resize;
                p.size = crop.unwrap_or(n);
            }
        }
        if let Some(r) = v.get("resample") {
            p.filter = r
                .as_i64()
                .and_then(ResizeFilter::from_pil_code)
                .ok_or_else(|| {
                    err(
                        "resample",
                        format!("resample filter {r}"),
                        "supported: 2 (bilinear) and 3 (bicubic)",
                    )
                })?;
        }
        if !flag("do_rescale") {
            p.rescale = 1.0;
        } else if let Some(f) = v.get("rescale_factor").and_then(|x| x.as_f64()) {
            p.rescale = f as f32;
        }
        if !flag("do_normalize") {
            p.mean = vec![0.0; model_channels];
            p.std = vec![1.0; model_channels];
        } else {
            for (key, dst) in [("image_mean", &mut p.mean), ("image_std", &mut p.std)] {
                let Some(x) = v.get(key) else { continue };
                let vals: Option<Vec<f32>> = match x {
                    serde_json::Value::Array(a) => {
                        a.iter().map(|y| y.as_f64().map(|f| f as f32)).collect()
                    }
                    y => y.as_f64().map(|f| vec![f as f32; model_channels]),
                };
                let vals = vals.ok_or_else(|| {
                    err(
                        key,
                        format!("value {x} is not a list of numbers"),
                        "write it as [0.5, 0.5, 0.5]",
                    )
                })?;
                if vals.len() != model_channels {
                    let (asked, model) = (kind(vals.len()), kind(model_channels));
                    return Err(err(
                        key,
                        format!(
                            "{} values ({asked}) but the model takes {model_channels} channel(s) ({model})",
                            vals.len()
                        ),
                        &format!(
                            "a {model} checkpoint needs {model_channels} value(s): use the preprocessor_config.json that belongs to this checkpoint, or the checkpoint this file belongs to"
                        ),
                    ));
                }
                *dst = vals;
            }
        }
        p.validate(origin)?;
        Ok(p)
    }

    /// The settings as a Hugging Face `preprocessor_config.json` (transformers'
    /// `BitImageProcessor` keys; augmentation is not part of it). Read back by
    /// [`Preprocess::from_hf_json`] to the same settings.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let size = match self.resize {
            Resize::ShortestEdge(n) => serde_json::json!({ "shortest_edge": n }),
            Resize::Exact(n) => serde_json::json!({ "height": n, "width": n }),
        };
        serde_json::json!({
            "image_processor_type": "BitImageProcessor",
            "do_resize": true,
            "size": size,
            "resample": match self.filter {
                ResizeFilter::Bilinear => 2,
                ResizeFilter::Bicubic => 3,
            },
            "do_center_crop": true,
            "crop_size": { "height": self.size, "width": self.size },
            "do_rescale": true,
            "rescale_factor": self.rescale,
            "do_normalize": true,
            "image_mean": self.mean,
            "image_std": self.std,
            "do_convert_rgb": self.channels == 3,
        })
    }

    /// Checks the settings; `origin` names them in the error.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |problem: String, fix: &str| DataError::Preprocess {
            origin: origin.to_string(),
            problem,
            fix: fix.to_string(),
        };
        if self.channels != 1 && self.channels != 3 {
            return Err(err(
                format!("{} channels", self.channels),
                "only 1 (greyscale) and 3 (RGB) channels are supported",
            ));
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return Err(err(
                format!(
                    "{} mean and {} std values for a {}-channel model",
                    self.mean.len(),
                    self.std.len(),
                    self.channels
                ),
                "give one mean and one std per channel",
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
            || !(self.rescale.is_finite() && self.rescale > 0.0)
        {
            return Err(err(
                format!(
                    "mean {:?}, std {:?}, rescale {}",
                    self.mean, self.std, self.rescale
                ),
                "means must be finite and std and rescale finite and above 0",
            ));
        }
        if self.size == 0 || self.size > 4096 {
            return Err(err(
                format!("output size {}", self.size),
                "use a size from 1 to 4096",
            ));
        }
        let (Resize::ShortestEdge(s) | Resize::Exact(s)) = self.resize;
        if s < self.size || s > 8192 {
            return Err(err(
                format!(
                    "resize to {s} with a centre crop of {}: the crop must fit",
                    self.size
                ),
                "resize to at least the output size (and at most 8192)",
            ));
        }
        if let Some(a) = &self.augment {
            let ok_prob = (0.0..=1.0).contains(&a.hflip_prob);
            let ok_scale = a
                .crop_scale
                .is_none_or(|(lo, hi)| lo > 0.0 && lo <= hi && hi <= 1.0);
            let (r0, r1) = a.crop_ratio;
            let ok_ratio = r0 > 0.0 && r0 <= r1 && r1.is_finite();
            if !(ok_prob && ok_scale && ok_ratio) {
                return Err(err(
                    format!("augmentation {a:?}"),
                    "the flip probability must lie in [0, 1], the crop scale in (0, 1] with low <= high, the ratios above 0 with low <= high",
                ));
            }
        }
        Ok(())
    }

    /// Refuses an image set this model cannot take: colour images for a
    /// greyscale (1-channel) model. Greyscale images for an RGB model are
    /// fine (the grey plane is repeated).
    pub fn check_set(&self, set: &ImageSet) -> Result<()> {
        self.validate("settings")?;
        if set.channels == 3 && self.channels == 1 {
            return Err(DataError::ChannelMismatch {
                source_desc: set.describe(),
                image_channels: 3,
                image_kind: "RGB",
                model_channels: 1,
                model_kind: "greyscale",
                fix: "use an RGB (3-channel) checkpoint, or convert the images to greyscale (e.g. `mogrify -colorspace Gray *.png`)".into(),
            });
        }
        Ok(())
    }

    /// Number of `f32` values per preprocessed image.
    pub fn output_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Preprocesses example `index` of a set in `epoch` into `out`
    /// ([`Preprocess::output_len`] values, CHW). Decoding errors name the file.
    pub fn process_into(
        &self,
        example: &ImageExample,
        index: usize,
        epoch: u64,
        out: &mut [f32],
    ) -> Result<()> {
        let px = example.source.load()?;
        if px.channels == 3 && self.channels == 1 {
            let what = example
                .source
                .path()
                .map(|p| format!("image `{}`", p.display()))
                .unwrap_or_else(|| "an in-memory image".into());
            return Err(DataError::ChannelMismatch {
                source_desc: what,
                image_channels: 3,
                image_kind: "RGB",
                model_channels: 1,
                model_kind: "greyscale",
                fix: "use an RGB (3-channel) checkpoint, or convert the images to greyscale".into(),
            });
        }
        self.pixels_into(&px, index, epoch, out);
        Ok(())
    }

    /// [`Preprocess::process_into`] into a new vector.
    pub fn process(&self, example: &ImageExample, index: usize, epoch: u64) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.output_len()];
        self.process_into(example, index, epoch, &mut out)?;
        Ok(out)
    }

    /// Preprocesses decoded pixels (1 or 3 channels; 3 needs an RGB model)
    /// into `out` (CHW). `index` and `epoch` seed the augmentation.
    pub fn pixels_into(&self, px: &Pixels<'_>, index: usize, epoch: u64, out: &mut [f32]) {
        assert_eq!(out.len(), self.output_len(), "output buffer length");
        assert!(
            px.channels <= self.channels,
            "colour pixels for a greyscale model"
        );
        let (w, h) = (px.width, px.height);
        let mut rng = self
            .augment
            .map(|_| SplitMix64::new(mix3(self.seed, epoch, index as u64)));
        let crop_box = match (&self.augment, rng.as_mut()) {
            (Some(a), Some(r)) => a
                .crop_scale
                .map(|scale| random_resized_crop(w, h, scale, a.crop_ratio, r)),
            _ => None,
        };
        let flip = match (&self.augment, rng.as_mut()) {
            (Some(a), Some(r)) => r.next_f64() < f64::from(a.hflip_prob),
            _ => false,
        };
        let (xw, yw) = match crop_box {
            Some((left, top, cw, ch)) => (
                axis_weights(self.filter, left, cw, self.size, 0, self.size),
                axis_weights(self.filter, top, ch, self.size, 0, self.size),
            ),
            None => {
                let (rw, rh) = match self.resize {
                    Resize::Exact(e) => (e, e),
                    Resize::ShortestEdge(s) => shortest_edge_dims(w, h, s),
                };
                let (ox, oy) = ((rw - self.size) / 2, (rh - self.size) / 2);
                (
                    axis_weights(self.filter, 0, w, rw, ox, self.size),
                    axis_weights(self.filter, 0, h, rh, oy, self.size),
                )
            }
        };
        let c = px.channels;
        let n = self.size;
        // Horizontal pass over the rows the vertical pass reads.
        let (row_lo, row_hi) = yw.span();
        let rows = row_hi - row_lo;
        let mut tmp = vec![0u8; rows * n * c];
        for (r, y) in (row_lo..row_hi).enumerate() {
            let src = &px.data[y * w * c..(y + 1) * w * c];
            let dst = &mut tmp[r * n * c..(r + 1) * n * c];
            for ox in 0..n {
                let (start, ws) = xw.taps(ox);
                for ch in 0..c {
                    let mut acc = 0.0f32;
                    for (k, &wt) in ws.iter().enumerate() {
                        acc += wt * f32::from(src[(start + k) * c + ch]);
                    }
                    dst[ox * c + ch] = to_u8(acc);
                }
            }
        }
        // Vertical pass, flip, rescale and normalise (a table per channel) into CHW planes.
        let plane = n * n;
        let luts: Vec<[f32; 256]> = (0..self.channels)
            .map(|och| {
                let mut t = [0.0f32; 256];
                for (v, x) in t.iter_mut().enumerate() {
                    *x = (v as f32 * self.rescale - self.mean[och]) / self.std[och];
                }
                t
            })
            .collect();
        let mut col = vec![0.0f32; n * c];
        let mut bytes = vec![0u8; n * c];
        for oy in 0..n {
            let (start, ws) = yw.taps(oy);
            col.iter_mut().for_each(|v| *v = 0.0);
            for (k, &wt) in ws.iter().enumerate() {
                let row = &tmp[(start + k - row_lo) * n * c..(start + k - row_lo + 1) * n * c];
                for (acc, &v) in col.iter_mut().zip(row) {
                    *acc += wt * f32::from(v);
                }
            }
            for (b, &v) in bytes.iter_mut().zip(&col) {
                *b = to_u8(v);
            }
            for (och, lut) in luts.iter().enumerate() {
                let ich = if c == 1 { 0 } else { och };
                let dst = &mut out[och * plane + oy * n..och * plane + (oy + 1) * n];
                let src = bytes.iter().skip(ich).step_by(c);
                if flip {
                    for (d, &v) in dst.iter_mut().rev().zip(src) {
                        *d = lut[usize::from(v)];
                    }
                } else {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = lut[usize::from(v)];
                    }
                }
            }
        }
    }
}

/// `"greyscale"` for 1 channel, else `"RGB"`.
fn kind(channels: usize) -> &'static str {
    if channels == 1 {
        "greyscale"
    } else {
        "RGB"
    }
}

/// Rounds (halves up) and clamps to a byte, as Pillow stores each pass.
fn to_u8(x: f32) -> u8 {
    (x + 0.5).clamp(0.0, 255.0) as u8
}

/// Dimensions after resizing the shorter side to `s` (transformers'
/// `get_resize_output_image_size`: the longer side is truncated).
fn shortest_edge_dims(w: usize, h: usize, s: usize) -> (usize, usize) {
    if w <= h {
        (s, (s as u64 * h as u64 / w as u64) as usize)
    } else {
        ((s as u64 * w as u64 / h as u64) as usize, s)
    }
}

/// Resampling weights along one axis: for each output index, the first
/// source index and its taps.
struct AxisWeights {
    starts: Vec<usize>,
    lens: Vec<usize>,
    stride: usize,
    weights: Vec<f32>,
}

impl AxisWeights {
    fn taps(&self, i: usize) -> (usize, &[f32]) {
        let w = &self.weights[i * self.stride..i * self.stride + self.lens[i]];
        (self.starts[i], w)
    }

    /// The source range `[lo, hi)` any output reads.
    fn span(&self) -> (usize, usize) {
        let lo = self.starts.iter().copied().min().unwrap_or(0);
        let hi = self
            .starts
            .iter()
            .zip(&self.lens)
            .map(|(s, l)| s + l)
            .max()
            .unwrap_or(0);
        (lo, hi)
    }
}

/// Pillow's `precompute_coeffs` for resizing the source box
/// `[box_lo, box_lo + box_len)` to `out_full` pixels, keeping outputs
/// `[take_from, take_from + take_n)`; the window is clipped to the box.
fn axis_weights(
    filter: ResizeFilter,
    box_lo: usize,
    box_len: usize,
    out_full: usize,
    take_from: usize,
    take_n: usize,
) -> AxisWeights {
    let scale = box_len as f64 / out_full as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let stride = (support.ceil() as usize) * 2 + 1;
    let mut starts = Vec::with_capacity(take_n);
    let mut lens = Vec::with_capacity(take_n);
    let mut weights = vec![0.0f32; take_n * stride];
    for (i, xx) in (take_from..take_from + take_n).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).trunc().max(0.0) as usize).min(box_len - 1);
        let xmax = ((center + support + 0.5).trunc().max(0.0) as usize).min(box_len);
        let len = (xmax.saturating_sub(xmin)).clamp(1, stride);
        let ws = &mut weights[i * stride..i * stride + len];
        let mut total = 0.0f64;
        let mut raw = Vec::with_capacity(len);
        for k in 0..len {
            let r = filter.eval((xmin as f64 + k as f64 - center + 0.5) / filterscale);
            total += r;
            raw.push(r);
        }
        if total == 0.0 {
            ws[0] = 1.0;
        } else {
            for (wt, r) in ws.iter_mut().zip(&raw) {
                *wt = (r / total) as f32;
            }
        }
        starts.push(box_lo + xmin);
        lens.push(len);
    }
    AxisWeights {
        starts,
        lens,
        stride,
        weights,
    }
}

/// torchvision's `RandomResizedCrop.get_params`: `(left, top, width, height)`.
fn random_resized_crop(
    w: usize,
    h: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut SplitMix64,
) -> (usize, usize, usize, usize) {
    let area = (w * h) as f64;
    let (lr0, lr1) = (f64::from(ratio.0).ln(), f64::from(ratio.1).ln());
    for _ in 0..10 {
        let target = area * rng.uniform(f64::from(scale.0), f64::from(scale.1));
        let aspect = rng.uniform(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let top = rng.below(h - ch + 1);
            let left = rng.below(w - cw + 1);
            return (left, top, cw, ch);
        }
    }
    // Fallback: the central crop with the ratio clamped into range.
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < f64::from(ratio.0) {
        (
            w,
            ((w as f64 / f64::from(ratio.0)).round() as usize).clamp(1, h),
        )
    } else if in_ratio > f64::from(ratio.1) {
        (
            ((h as f64 * f64::from(ratio.1)).round() as usize).clamp(1, w),
            h,
        )
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// The SplitMix64 generator (Steele, Lea and Flood 2014).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_f64() * n as f64) as usize).min(n - 1)
    }
}

/// One seed from three numbers.
fn mix3(a: u64, b: u64, c: u64) -> u64 {
    let mut r = SplitMix64::new(a);
    let x = r.next_u64() ^ b;
    let mut r = SplitMix64::new(x);
    let y = r.next_u64() ^ c;
    SplitMix64::new(y).next_u64()
}

/// A deterministic shuffle of `0..n` for `(seed, epoch)` (Fisher-Yates with
/// SplitMix64).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut r = SplitMix64::new(mix3(seed, epoch, u64::MAX));
    for i in (1..n).rev() {
        let j = r.below(i + 1);
        order.swap(i, j);
    }
    order
}

/// A batch ready for the model.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `f32` `[B, C, H, W]` on the CPU.
    pub pixels: Tensor,
    /// `u32` `[B]` class ids.
    pub labels: Tensor,
    /// The examples' indices in the set.
    pub indices: Vec<usize>,
}

/// Options of [`Batcher::prefetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchOptions {
    /// Worker threads, each preparing whole batches (at least 1).
    pub workers: usize,
    /// Finished batches each worker may hold ahead of the consumer (at least 1).
    pub depth: usize,
}

impl Default for PrefetchOptions {
    /// One worker, two batches ahead: with two cores, one decodes while the
    /// other trains.
    fn default() -> Self {
        PrefetchOptions {
            workers: 1,
            depth: 2,
        }
    }
}

/// Builds batches of an image set with a preprocessing pipeline.
#[derive(Debug, Clone)]
pub struct Batcher {
    set: Arc<ImageSet>,
    pre: Arc<Preprocess>,
}

impl Batcher {
    /// A batcher for `set`; refuses a set the model cannot take (see
    /// [`Preprocess::check_set`]).
    pub fn new(set: Arc<ImageSet>, pre: Preprocess) -> Result<Self> {
        pre.check_set(&set)?;
        Ok(Batcher {
            set,
            pre: Arc::new(pre),
        })
    }

    /// The set.
    pub fn set(&self) -> &ImageSet {
        &self.set
    }

    /// The preprocessing.
    pub fn preprocess(&self) -> &Preprocess {
        &self.pre
    }

    /// The batch of the examples `indices` (indices into the set) in `epoch`.
    /// Panics when an index is out of range.
    pub fn batch(&self, indices: &[usize], epoch: u64) -> Result<ImageBatch> {
        let per = self.pre.output_len();
        let mut data = vec![0.0f32; indices.len() * per];
        let mut labels = Vec::with_capacity(indices.len());
        for (k, &i) in indices.iter().enumerate() {
            let ex = &self.set.examples[i];
            self.pre
                .process_into(ex, i, epoch, &mut data[k * per..(k + 1) * per])?;
            labels.push(ex.label as u32);
        }
        let n = self.pre.size;
        let b = indices.len();
        let pixels = Tensor::from_vec(data, (b, self.pre.channels, n, n), &Device::Cpu)
            .expect("length matches the shape");
        let labels = Tensor::from_vec(labels, b, &Device::Cpu).expect("length matches the shape");
        Ok(ImageBatch {
            pixels,
            labels,
            indices: indices.to_vec(),
        })
    }

    /// The batches of `order` (chunks of `batch_size`, the last may be
    /// shorter), prepared on the calling thread when asked for.
    pub fn batches<'a>(
        &'a self,
        order: &'a [usize],
        batch_size: usize,
        epoch: u64,
    ) -> impl Iterator<Item = Result<ImageBatch>> + 'a {
        order
            .chunks(batch_size.max(1))
            .map(move |c| self.batch(c, epoch))
    }

    /// The batches of `order`, as [`Batcher::batches`], prepared ahead by
    /// `opts.workers` threads (worker `w` prepares batches `w, w + workers,
    /// ...`, each holding at most `opts.depth` finished ones) and yielded in
    /// order: the same batches as [`Batcher::batches`], whatever the thread
    /// count. Dropping the iterator stops and joins the workers.
    pub fn prefetch(
        &self,
        order: Vec<usize>,
        batch_size: usize,
        epoch: u64,
        opts: PrefetchOptions,
    ) -> Prefetcher {
        let batch_size = batch_size.max(1);
        let total = order.len().div_ceil(batch_size);
        let workers = opts.workers.clamp(1, total.max(1));
        let order: Arc<[usize]> = order.into();
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx): (SyncSender<Result<ImageBatch>>, Receiver<Result<ImageBatch>>) =
                std::sync::mpsc::sync_channel(opts.depth.max(1));
            let me = self.clone();
            let order = order.clone();
            let h = std::thread::Builder::new()
                .name(format!("deltatune-images-{w}"))
                .spawn(move || {
                    for b in (w..total).step_by(workers) {
                        let lo = b * batch_size;
                        let hi = (lo + batch_size).min(order.len());
                        let res = me.batch(&order[lo..hi], epoch);
                        if tx.send(res).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawning a data worker thread");
            receivers.push(rx);
            handles.push(Some(h));
        }
        Prefetcher {
            receivers,
            handles,
            next: 0,
            total,
        }
    }
}

/// Batches prepared ahead by worker threads, in order (see [`Batcher::prefetch`]).
#[derive(Debug)]
pub struct Prefetcher {
    receivers: Vec<Receiver<Result<ImageBatch>>>,
    handles: Vec<Option<JoinHandle<()>>>,
    next: usize,
    total: usize,
}

impl Prefetcher {
    /// Number of batches in all.
    pub fn total(&self) -> usize {
        self.total
    }
}

impl Iterator for Prefetcher {
    type Item = Result<ImageBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let w = self.next % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(b) => {
                self.next += 1;
                Some(b)
            }
            Err(_) => {
                // The worker ended early: it panicked; pass the panic on.
                self.next = self.total;
                if let Some(Err(p)) = self.handles[w].take().map(JoinHandle::join) {
                    std::panic::resume_unwind(p);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.total - self.next;
        (n, Some(n))
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channels unblocks workers waiting to send.
        self.receivers.clear();
        for h in self.handles.iter_mut().filter_map(Option::take) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_identity_and_sum() {
        let a = axis_weights(ResizeFilter::Bilinear, 0, 5, 5, 0, 5);
        for i in 0..5 {
            let (s, w) = a.taps(i);
            let nz: Vec<(usize, f32)> = w
                .iter()
                .enumerate()
                .filter(|(_, &x)| x != 0.0)
                .map(|(k, &x)| (s + k, x))
                .collect();
            assert_eq!(nz, vec![(i, 1.0)]);
        }
        for f in [ResizeFilter::Bilinear, ResizeFilter::Bicubic] {
            for (inp, out) in [(28, 224), (224, 28), (3, 7), (100, 33)] {
                let a = axis_weights(f, 0, inp, out, 0, out);
                for i in 0..out {
                    let (s, w) = a.taps(i);
                    assert!(s + w.len() <= inp);
                    let sum: f32 = w.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-5, "{f:?} {inp}->{out} {i}: {sum}");
                }
            }
        }
    }

    /// What `to_hf_json` writes reads back to the same settings (the merged image model's
    /// preprocessor_config.json keeps the adapter's preprocessing).
    #[test]
    fn hf_preprocessor_config_round_trips() {
        let rgb = Preprocess::for_model(3).unwrap().with_size(112);
        let mut grey = Preprocess::for_model(1).unwrap();
        grey.resize = Resize::Exact(40);
        grey.size = 32;
        grey.filter = ResizeFilter::Bicubic;
        grey.mean = vec![0.5];
        grey.std = vec![0.25];
        for (p, ch) in [(rgb, 3), (grey, 1)] {
            let back = Preprocess::from_hf_json(&p.to_hf_json(), "test", ch).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn shortest_edge_truncates_like_transformers() {
        assert_eq!(shortest_edge_dims(640, 480, 256), (341, 256));
        assert_eq!(shortest_edge_dims(28, 28, 224), (224, 224));
        assert_eq!(shortest_edge_dims(3, 10, 4), (4, 13));
    }

    #[test]
    fn epoch_order_is_a_permutation_and_deterministic() {
        let a = epoch_order(100, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 1, 0));
        assert_ne!(a, epoch_order(100, 1, 1));
        assert_ne!(a, epoch_order(100, 2, 0));
    }

    #[test]
    fn random_crop_fits() {
        let mut r = SplitMix64::new(3);
        for _ in 0..1000 {
            let (l, t, w, h) = random_resized_crop(28, 20, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut r);
            assert!(w > 0 && h > 0 && l + w <= 28 && t + h <= 20);
        }
    }
}
