//! Image data: IDX files, the folder layout, preprocessing (against hand-computed
//! values and `tests/fixtures/images/preprocess.json` from `scripts/gen_image_fixtures.py`),
//! augmentation, batching and prefetching; and the real Fashion-MNIST package when it is
//! present (the .deb in `$DELTATUNE_TEST_DEBS`, `/tmp/assets` or `/tmp/pkgs`, or a fetched
//! cache; the test prints a note and passes when it is absent, unless
//! `DELTATUNE_REQUIRE_ASSETS=1`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deltatune_data::assets::FetchOptions;
use deltatune_data::fashion_mnist::{self, FASHION_MNIST_CLASSES};
use deltatune_data::idx::{self, encode_idx};
use deltatune_data::images::{
    load_image_folder, Augment, Batcher, ImageExample, ImageSet, ImageSource, Pixels,
    PrefetchOptions, Preprocess, Resize, ResizeFilter,
};
use deltatune_data::DataError;

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_plain_and_gzip() {
    let t = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..3 * 2 * 4).map(|i| i as u8 * 10).collect();
    let images = encode_idx(&[3, 2, 4], &pixels);
    let labels = encode_idx(&[3], &[2, 0, 1]);
    for (name, im, lb) in [
        ("plain", images.clone(), labels.clone()),
        ("gz", gz(&images), gz(&labels)),
    ] {
        let ip = t.path().join(format!("{name}-images"));
        let lp = t.path().join(format!("{name}-labels"));
        std::fs::write(&ip, im).unwrap();
        std::fs::write(&lp, lb).unwrap();
        let (i, l) = idx::read_idx_pair(&ip, &lp, 3).unwrap();
        assert_eq!((i.count, i.rows, i.cols), (3, 2, 4), "{name}");
        assert_eq!(i.image(1), &pixels[8..16]);
        assert_eq!(l, vec![2, 0, 1]);
        // As an image set.
        let classes: Arc<[String]> = vec!["a".to_string(), "b".into(), "c".into()].into();
        let set = fashion_mnist::load_idx_set("train", &ip, &lp, classes).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.channels, 1);
        assert_eq!(set.class_counts(), vec![1, 1, 1]);
        let px = set.examples[2].source.load().unwrap();
        assert_eq!((px.width, px.height, px.channels), (4, 2, 1));
        assert_eq!(&px.data[..], &pixels[16..24]);
        // A label beyond the classes.
        let e = idx::read_idx_pair(&ip, &lp, 2).unwrap_err().to_string();
        assert!(
            e.contains("label 2 of item 0") && e.contains(&lp.display().to_string()),
            "{e}"
        );
    }
}

#[test]
fn idx_counts_disagree_names_both_files() {
    let t = tempfile::tempdir().unwrap();
    let ip = t.path().join("train-images-idx3-ubyte.gz");
    let lp = t.path().join("t10k-labels-idx1-ubyte.gz");
    std::fs::write(&ip, gz(&encode_idx(&[3, 1, 1], &[1, 2, 3]))).unwrap();
    std::fs::write(&lp, gz(&encode_idx(&[2], &[0, 1]))).unwrap();
    let e = idx::read_idx_pair(&ip, &lp, 10).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, DataError::IdxCountMismatch { .. }), "{s}");
    for want in [
        "train-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "3 images",
        "2 labels",
    ] {
        assert!(s.contains(want), "missing {want:?} in {s}");
    }
}

#[test]
fn idx_hostile_headers_are_errors() {
    let t = tempfile::tempdir().unwrap();
    let huge = [
        0u8, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    // Claims ~60,000 28x28 images but holds 10 bytes: compressed, so read incrementally.
    let mut short = encode_idx(&[60_000, 28, 28], &[]);
    short.extend_from_slice(&[7; 10]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("huge.idx", huge.to_vec(), "more than 1073741824 bytes"),
        ("huge.idx.gz", gz(&huge), "more than 1073741824 bytes"),
        (
            "big.idx.gz",
            gz(&encode_idx(&[32_768, 32_768, 2], &[])),
            "[32768, 32768, 2], more than 1073741824 bytes",
        ),
        ("short.idx", short.clone(), "the file is 26 bytes long"),
        ("short.idx.gz", gz(&short), "only 10 data bytes follow"),
        (
            "trailing.gz",
            gz(&[0, 0, 8, 1, 0, 0, 0, 1, 5, 6]),
            "more data follows",
        ),
        ("ndims.idx", vec![0, 0, 8, 200], "200 dimensions"),
        ("magic.idx", b"PK\x03\x04 zip".to_vec(), "0x50 0x4b"),
        ("empty.idx", Vec::new(), "0 bytes"),
        ("notgz.gz", vec![0x1f, 0x8b, 1, 2, 3], "reading failed"),
    ];
    for (name, bytes, want) in cases {
        let p = t.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        let e = idx::read_idx(&p).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, DataError::Idx { .. }), "{name}: {s}");
        assert!(
            s.contains(name) && s.contains(want),
            "{name}: missing {want:?} in {s}"
        );
    }
    // Images need three dimensions.
    let p = t.path().join("labels-as-images");
    std::fs::write(&p, encode_idx(&[2], &[0, 1])).unwrap();
    let e = idx::read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("[2]") && e.contains("not images"), "{e}");
}

fn write_png_grey(path: &Path, w: u32, h: u32, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_pixel(w, h, image::Luma([v]))
        .save(path)
        .unwrap();
}

fn write_png_rgb(path: &Path, w: u32, h: u32, v: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb(v))
        .save(path)
        .unwrap();
}

fn folder_problem(e: DataError) -> (PathBuf, String) {
    match e {
        DataError::ImageFolder { path, problem, .. } => (path, problem),
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn folder_layout_labels_and_errors() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("data");
    write_png_grey(&root.join("train/dog/b.png"), 3, 2, 10);
    write_png_grey(&root.join("train/dog/a.png"), 3, 2, 20);
    write_png_grey(&root.join("train/Zebra/z.PNG"), 3, 2, 30);
    write_png_grey(&root.join("train/cat/c.png"), 3, 2, 40);
    std::fs::write(root.join("train/cat/notes.txt"), b"skipped").unwrap();
    std::fs::write(root.join("train/cat/.hidden.png"), b"skipped").unwrap();
    write_png_grey(&root.join("test/dog/x.png"), 3, 2, 50);
    write_png_grey(&root.join("test/cat/y.png"), 3, 2, 60);
    write_png_grey(&root.join("test/Zebra/w.png"), 3, 2, 70);
    let s = load_image_folder(&root).unwrap();
    // Byte order: upper case first.
    assert_eq!(&s.classes[..], &["Zebra", "cat", "dog"]);
    assert!(s.dev.is_none());
    let labels: Vec<(String, usize)> = s
        .train
        .examples
        .iter()
        .map(|e| {
            let p = e.source.path().unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                e.label,
            )
        })
        .collect();
    assert_eq!(
        labels,
        vec![
            ("z.PNG".into(), 0),
            ("c.png".into(), 1),
            ("a.png".into(), 2),
            ("b.png".into(), 2)
        ]
    );
    assert_eq!(s.train.channels, 1);
    let test = s.test.unwrap();
    assert_eq!(test.class_counts(), vec![1, 1, 1]);
    assert_eq!(test.split, "test");

    // A file that is not an image is named.
    std::fs::write(root.join("train/cat/broken.png"), b"this is not a png").unwrap();
    let e = load_image_folder(&root).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, DataError::ImageDecode { .. }), "{s}");
    assert!(s.contains("broken.png"), "{s}");
    std::fs::remove_file(root.join("train/cat/broken.png")).unwrap();

    // An empty class folder.
    std::fs::create_dir_all(root.join("train/emu")).unwrap();
    std::fs::write(root.join("train/emu/readme.md"), b"x").unwrap();
    let (p, problem) = folder_problem(load_image_folder(&root).unwrap_err());
    assert!(p.ends_with("train/emu"), "{p:?}");
    assert!(
        problem.contains("`emu` has no images") && problem.contains("readme.md"),
        "{problem}"
    );
    std::fs::remove_dir_all(root.join("train/emu")).unwrap();

    // Class sets that differ across splits.
    write_png_grey(&root.join("test/emu/e.png"), 3, 2, 1);
    std::fs::remove_dir_all(root.join("test/cat")).unwrap();
    let (p, problem) = folder_problem(load_image_folder(&root).unwrap_err());
    assert!(p.ends_with("test"), "{p:?}");
    assert!(
        problem.contains("missing [`cat`]") && problem.contains("not in train [`emu`]"),
        "{problem}"
    );
    std::fs::remove_dir_all(root.join("test")).unwrap();

    // No train folder; an image outside a class folder.
    let (_, problem) = folder_problem(load_image_folder(&root.join("train")).unwrap_err());
    assert!(
        problem.contains("no `train` folder") && problem.contains("`cat`"),
        "{problem}"
    );
    write_png_grey(&root.join("train/loose.png"), 1, 1, 0);
    let (p, problem) = folder_problem(load_image_folder(&root).unwrap_err());
    assert!(
        p.ends_with("loose.png") && problem.contains("outside any class folder"),
        "{problem}"
    );
}

#[test]
fn channels_grey_rgb_and_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("rgb");
    write_png_grey(&root.join("train/a/1.png"), 2, 2, 10);
    write_png_rgb(&root.join("train/b/2.png"), 2, 2, [255, 0, 0]);
    let s = load_image_folder(&root).unwrap();
    assert_eq!(s.train.channels, 3);
    let set = Arc::new(s.train);
    // An RGB set for a greyscale model: refused, naming the split folder and the fix.
    let e = Batcher::new(set.clone(), Preprocess::for_model(1).unwrap()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::ChannelMismatch { .. }), "{msg}");
    assert!(
        msg.contains("rgb/train") && msg.contains("greyscale") && msg.contains("RGB"),
        "{msg}"
    );
    // RGB model: the grey image is repeated; the red one normalised per channel.
    let pre = Preprocess {
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
        ..Preprocess::for_model(3).unwrap().with_size(2)
    };
    let b = Batcher::new(set, pre).unwrap();
    let batch = b.batch(&[0, 1], 0).unwrap();
    assert_eq!(batch.pixels.dims(), &[2, 3, 2, 2]);
    let v = batch
        .pixels
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        v[..12].iter().all(|&x| (x - 10.0 / 255.0).abs() < 1e-6),
        "{v:?}"
    );
    assert_eq!(
        &v[12..24],
        &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), vec![0, 1]);

    // A file that passes the header check but does not decode: named at batch time.
    let root = t.path().join("trunc");
    write_png_grey(&root.join("train/a/ok.png"), 8, 8, 1);
    let bytes = std::fs::read(root.join("train/a/ok.png")).unwrap();
    std::fs::write(root.join("train/a/cut.png"), &bytes[..bytes.len() - 20]).unwrap();
    let s = load_image_folder(&root).unwrap();
    let b = Batcher::new(
        Arc::new(s.train),
        Preprocess::for_model(3).unwrap().with_size(4),
    )
    .unwrap();
    let e = b.batch(&[0, 1], 0).unwrap_err().to_string();
    assert!(
        e.contains("cut.png") && e.contains("does not decode"),
        "{e}"
    );
}

fn grey_set(w: usize, h: usize, images: Vec<Vec<u8>>) -> ImageSet {
    let n = images.len();
    let flat: Vec<u8> = images.concat();
    let shared: Arc<[u8]> = flat.into();
    ImageSet {
        split: "train".into(),
        origin: PathBuf::from("<test>"),
        classes: vec!["x".to_string(), "y".into()].into(),
        channels: 1,
        examples: (0..n)
            .map(|i| ImageExample {
                source: ImageSource::Memory {
                    pixels: shared.clone(),
                    offset: i * w * h,
                    width: w,
                    height: h,
                },
                label: i % 2,
            })
            .collect(),
    }
}

#[test]
fn bilinear_2x2_to_4x4_by_hand() {
    // Rows [0, 80] and [160, 240]: horizontally [a, .75a+.25b, .25a+.75b, b] (Pillow's
    // triangle weights with half-pixel centres, edges repeated), the same vertically.
    let set = grey_set(2, 2, vec![vec![0, 80, 160, 240]]);
    let pre = Preprocess {
        mean: vec![0.5],
        std: vec![0.25],
        ..Preprocess::for_model(1).unwrap().with_size(4)
    };
    let out = pre.process(&set.examples[0], 0, 0).unwrap();
    let rows = [
        [0.0, 20.0, 60.0, 80.0],
        [40.0, 60.0, 100.0, 120.0],
        [120.0, 140.0, 180.0, 200.0],
        [160.0, 180.0, 220.0, 240.0],
    ];
    let want: Vec<f32> = rows
        .iter()
        .flatten()
        .map(|&v: &f32| (v / 255.0 - 0.5) / 0.25)
        .collect();
    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-6, "pixel {i}: {g} vs {w}");
    }
    // With a shortest-edge resize of 6 and a centre crop of 4: the middle of the 6x6 grid.
    let pre6 = Preprocess {
        resize: Resize::ShortestEdge(6),
        ..pre.clone()
    };
    let six = Preprocess {
        resize: Resize::Exact(6),
        ..pre.clone().with_size(6)
    };
    let o4 = pre6.process(&set.examples[0], 0, 0).unwrap();
    let o6 = six.process(&set.examples[0], 0, 0).unwrap();
    for y in 0..4 {
        assert_eq!(&o4[y * 4..y * 4 + 4], &o6[(y + 1) * 6 + 1..(y + 1) * 6 + 5]);
    }
}

#[test]
fn preprocess_matches_reference_fixtures() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images/preprocess.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for c in v["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        let fl = |k: &str| -> Vec<f32> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        let pixels: Vec<u8> = c["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect();
        let n = c["resize"]["n"].as_u64().unwrap() as usize;
        let pre = Preprocess {
            size: u("size"),
            resize: if c["resize"]["mode"] == "shortest_edge" {
                Resize::ShortestEdge(n)
            } else {
                Resize::Exact(n)
            },
            filter: if c["filter"] == "bilinear" {
                ResizeFilter::Bilinear
            } else {
                ResizeFilter::Bicubic
            },
            mean: fl("mean"),
            std: fl("std"),
            channels: u("out_channels"),
            ..Preprocess::for_model(3).unwrap()
        };
        pre.validate(name).unwrap();
        let px = Pixels {
            width: u("width"),
            height: u("height"),
            channels: u("channels"),
            data: pixels.into(),
        };
        let mut out = vec![0.0; pre.output_len()];
        pre.pixels_into(&px, 0, 0, &mut out);
        let want = fl("expected_chw");
        assert_eq!(out.len(), want.len(), "{name}");
        // Both round each pass to 8 bits, halves up, as Pillow does.
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-4, "{name} value {i}: {g} vs {w}");
        }
    }
}

#[test]
fn augmentation_is_deterministic_per_seed_epoch_index() {
    let img: Vec<u8> = (0..28 * 28).map(|i| ((i * 7919) % 251) as u8).collect();
    let set = grey_set(28, 28, vec![img.clone(), img]);
    let pre = Preprocess::for_model(3)
        .unwrap()
        .with_size(32)
        .with_augment(Some(Augment::default()), 7);
    let ex = &set.examples[0];
    let a = pre.process(ex, 0, 0).unwrap();
    assert_eq!(a, pre.process(ex, 0, 0).unwrap(), "same seed, epoch, index");
    // Another epoch, index or seed: another crop (same pixels otherwise).
    let others = [
        pre.process(ex, 0, 1).unwrap(),
        pre.process(&set.examples[1], 1, 0).unwrap(),
        pre.clone()
            .with_augment(Some(Augment::default()), 8)
            .process(ex, 0, 0)
            .unwrap(),
    ];
    for o in &others {
        assert_ne!(&a, o);
    }
    // Flip only, probability 1: the mirror image of the plain output.
    let plain = Preprocess::for_model(1).unwrap().with_size(28);
    let flip = plain.clone().with_augment(
        Some(Augment {
            hflip_prob: 1.0,
            crop_scale: None,
            ..Augment::default()
        }),
        0,
    );
    let p = plain.process(ex, 0, 0).unwrap();
    let f = flip.process(ex, 0, 3).unwrap();
    for y in 0..28 {
        for x in 0..28 {
            assert_eq!(p[y * 28 + x], f[y * 28 + 27 - x]);
        }
    }
    // Without augmentation, the 28x28 image at 28x28 is the image itself.
    let want: Vec<f32> = set.examples[0]
        .source
        .load()
        .unwrap()
        .data
        .iter()
        .map(|&v| (f32::from(v) / 255.0 - plain.mean[0]) / plain.std[0])
        .collect();
    for (g, w) in p.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    // Crops over many epochs cover different areas and stay in range.
    let crops: std::collections::HashSet<Vec<u32>> = (0..20)
        .map(|e| {
            pre.process(ex, 0, e)
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    assert!(crops.len() >= 19);
}

#[test]
fn prefetch_yields_the_plain_batches_in_order() {
    let images: Vec<Vec<u8>> = (0..23)
        .map(|k| {
            (0..28 * 28)
                .map(|i| ((i * 31 + k * 17) % 256) as u8)
                .collect()
        })
        .collect();
    let set = Arc::new(grey_set(28, 28, images));
    let pre = Preprocess::for_model(3)
        .unwrap()
        .with_size(40)
        .with_augment(Some(Augment::default()), 3);
    let b = Batcher::new(set, pre).unwrap();
    let order = deltatune_data::images::epoch_order(23, 5, 2);
    let plain: Vec<_> = b.batches(&order, 4, 2).map(|r| r.unwrap()).collect();
    assert_eq!(plain.len(), 6);
    assert_eq!(plain[5].pixels.dims(), &[3, 3, 40, 40]);
    for workers in [1, 2, 3, 8] {
        let opts = PrefetchOptions { workers, depth: 1 };
        let pf = b.prefetch(order.clone(), 4, 2, opts);
        assert_eq!(pf.total(), 6);
        let got: Vec<_> = pf.map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), plain.len());
        for (g, p) in got.iter().zip(&plain) {
            assert_eq!(g.indices, p.indices);
            let gv = g.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let pv = p.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(gv, pv, "workers {workers}");
            assert_eq!(
                g.labels.to_vec1::<u32>().unwrap(),
                p.labels.to_vec1::<u32>().unwrap()
            );
        }
    }
    // Dropping early stops the workers (the test would hang otherwise).
    let mut pf = b.prefetch(
        order.clone(),
        2,
        0,
        PrefetchOptions {
            workers: 2,
            depth: 1,
        },
    );
    assert!(pf.next().is_some());
    drop(pf);
    // An empty order yields nothing.
    assert_eq!(
        b.prefetch(Vec::new(), 4, 0, PrefetchOptions::default())
            .count(),
        0
    );
}

#[test]
fn hf_preprocessor_configs() {
    let t = tempfile::tempdir().unwrap();
    let write = |name: &str, json: &str| {
        let p = t.path().join(name);
        std::fs::write(&p, json).unwrap();
        p
    };
    // ViT (google/vit-base-patch16-224).
    let vit = write(
        "vit.json",
        r#"{"do_normalize": true, "do_resize": true, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00392156862745098,
            "size": {"height": 224, "width": 224}}"#,
    );
    let p = Preprocess::from_hf_config(&vit, 3).unwrap();
    assert_eq!(
        (p.size, p.resize, p.filter),
        (224, Resize::Exact(224), ResizeFilter::Bilinear)
    );
    assert_eq!(p.mean, vec![0.5; 3]);
    // Dinov2.
    let dino = write(
        "dino.json",
        r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "resample": 3, "size": {"shortest_edge": 256}}"#,
    );
    let p = Preprocess::from_hf_config(&dino, 3).unwrap();
    assert_eq!(
        (p.size, p.resize, p.filter),
        (224, Resize::ShortestEdge(256), ResizeFilter::Bicubic)
    );
    // An RGB normalisation for a greyscale checkpoint, and the reverse: named by file and key.
    let e = Preprocess::from_hf_config(&dino, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dino.json")
            && e.contains("`image_mean`")
            && e.contains("3 values (RGB)")
            && e.contains("1 channel(s) (greyscale)"),
        "{e}"
    );
    let grey = write(
        "grey.json",
        r#"{"image_mean": [0.5], "image_std": [0.5], "size": 28}"#,
    );
    let e = Preprocess::from_hf_config(&grey, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("grey.json") && e.contains("1 values (greyscale)") && e.contains("(RGB)"),
        "{e}"
    );
    let p = Preprocess::from_hf_config(&grey, 1).unwrap();
    assert_eq!((p.size, p.resize), (28, Resize::Exact(28)));
    let bad = write("bad.json", r#"{"resample": 1}"#);
    let e = Preprocess::from_hf_config(&bad, 3).unwrap_err().to_string();
    assert!(e.contains("`resample`") && e.contains("bicubic"), "{e}");
    let e = Preprocess::for_model(4).unwrap_err().to_string();
    assert!(e.contains("4 input channels"), "{e}");
}

fn deb_dir() -> Option<PathBuf> {
    let file = "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb";
    std::env::var_os("DELTATUNE_TEST_DEBS")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/tmp/assets"), PathBuf::from("/tmp/pkgs")])
        .find(|d| d.join(file).is_file())
}

fn check_fashion_mnist(dir: &Path) {
    let s = fashion_mnist::load_fashion_mnist(dir).unwrap();
    assert_eq!(&s.classes[..], &FASHION_MNIST_CLASSES.map(String::from));
    let (dev, test) = (s.dev.unwrap(), s.test.unwrap());
    assert_eq!(s.train.len() + dev.len(), 60_000);
    assert_eq!(
        (s.train.len(), dev.len(), test.len()),
        (
            fashion_mnist::TRAIN_COUNT,
            fashion_mnist::DEV_COUNT,
            fashion_mnist::TEST_COUNT
        )
    );
    // The first training image is an ankle boot (label 9), as is the first test image.
    let first = s.train.examples.first().unwrap();
    let first_dev = dev.examples.first().unwrap();
    let off = |e: &ImageExample| match e.source {
        ImageSource::Memory { offset, .. } => offset,
        _ => panic!("in memory"),
    };
    assert!(off(first) == 0 || off(first_dev) == 0);
    let zero = if off(first) == 0 { first } else { first_dev };
    assert_eq!(zero.label, 9);
    assert_eq!(test.examples[0].label, 9);
    let px = zero.source.load().unwrap();
    assert_eq!((px.width, px.height, px.channels), (28, 28, 1));
    // Balanced test set: 1,000 per class.
    assert_eq!(test.class_counts(), vec![1000; 10]);
    let train_counts: usize = s.train.class_counts().iter().sum();
    assert_eq!(train_counts, fashion_mnist::TRAIN_COUNT);
}

#[test]
fn fashion_mnist_real() {
    if let Some(dd) = deb_dir() {
        let cache = tempfile::tempdir().unwrap();
        let opts = FetchOptions {
            deb_dir: Some(dd),
            apt_get: Some(vec!["false".into()]),
            ..Default::default()
        };
        let dir = fashion_mnist::fetch_fashion_mnist(cache.path(), &opts, &mut |m: &str| {
            eprintln!("{m}")
        })
        .unwrap();
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("deltatune-manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["stats"]["train"], fashion_mnist::TRAIN_COUNT);
        check_fashion_mnist(&dir);
        let mut log = Vec::new();
        fashion_mnist::fetch_fashion_mnist(cache.path(), &opts, &mut |m: &str| {
            log.push(m.to_string())
        })
        .unwrap();
        assert!(log.iter().any(|m| m.contains("up to date")), "{log:?}");
        return;
    }
    let cached =
        fashion_mnist::fashion_mnist_ready_dir(&deltatune_data::assets::default_cache_dir());
    if let Ok(dir) = cached {
        check_fashion_mnist(&dir);
        return;
    }
    assert!(
        std::env::var("DELTATUNE_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "fashion_mnist_real: no Fashion-MNIST package or fetched folder and DELTATUNE_REQUIRE_ASSETS=1"
    );
    eprintln!("NOTE: skipping fashion_mnist_real: no dataset-fashion-mnist .deb in $DELTATUNE_TEST_DEBS, /tmp/assets or /tmp/pkgs and no fetched folder (run `deltatune fetch`)");
}
