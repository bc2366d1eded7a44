//! The data pipeline: class indices, odd image files, and preprocessing against Pillow.

mod common;

use fqvit_calib::data::{ImageFolder, class_index, classes, preprocess, resize_and_crop};
use fqvit_calib::decode::{decode_rgb, load_rgb};
use fqvit_calib::resize::{RgbImage, resize_bicubic};
use fqvit_models::Preprocess;

#[test]
fn class_indices_are_positions_in_the_sorted_wnid_list() {
    let wnids: Vec<&str> = classes().map(|(w, _)| w).collect();
    assert_eq!(wnids.len(), 1000);
    assert!(wnids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(class_index("n01440764"), Some(0));
    assert_eq!(class_index("n01443537"), Some(1));
    assert_eq!(class_index("n15075141"), Some(999));
    assert_eq!(class_index("n00000000"), None);
    let val = ImageFolder::open(&common::sample_dir(), "val").unwrap();
    assert_eq!(val.samples().len(), 1300);
    let mut labels: Vec<usize> = val.samples().iter().map(|s| s.label).collect();
    labels.dedup();
    assert_eq!(labels.len(), 725, "725 classes, each contiguous in sorted order");
    for s in val.samples() {
        let wnid = s.rel_path.split('/').nth(1).unwrap();
        assert_eq!(class_index(wnid), Some(s.label), "{}", s.rel_path);
    }
}

fn a_real_image() -> (Vec<u8>, RgbImage) {
    let dir = common::sample_dir().join("val/n01440764");
    let path = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    (std::fs::read(&path).unwrap(), load_rgb(&path).unwrap())
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs()).sum::<f64>()
        / a.len() as f64
}

fn compress(
    pixels: &[u8],
    img: &RgbImage,
    format: turbojpeg::PixelFormat,
    subsamp: turbojpeg::Subsamp,
) -> Vec<u8> {
    let image = turbojpeg::Image {
        pixels,
        width: img.width,
        pitch: img.width * format.size(),
        height: img.height,
        format,
    };
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(95).unwrap();
    c.set_subsamp(subsamp).unwrap();
    c.compress_to_vec(image).unwrap()
}

#[test]
fn grayscale_jpeg_decodes_to_replicated_rgb() {
    let (_, rgb) = a_real_image();
    let gray: Vec<u8> = rgb
        .data
        .chunks(3)
        .map(|p| ((u32::from(p[0]) + u32::from(p[1]) + u32::from(p[2])) / 3) as u8)
        .collect();
    let jpeg = compress(&gray, &rgb, turbojpeg::PixelFormat::GRAY, turbojpeg::Subsamp::Gray);
    let out = decode_rgb(&jpeg).unwrap();
    assert_eq!((out.width, out.height), (rgb.width, rgb.height));
    assert!(
        out.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]),
        "gray replicated to R = G = B"
    );
    let decoded_gray: Vec<u8> = out.data.chunks(3).map(|p| p[0]).collect();
    assert!(mean_abs_diff(&decoded_gray, &gray) < 2.0);
}

#[test]
fn cmyk_jpeg_decodes_as_pillow_does() {
    let (_, rgb) = a_real_image();
    // With K = 255 stored (no black under Adobe's inverted convention), Pillow's conversion gives
    // back the C, M, Y codes as R, G, B; a decoder that forgot the inversion would give 255 − x.
    let cmyk: Vec<u8> = rgb.data.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
    let jpeg = compress(&cmyk, &rgb, turbojpeg::PixelFormat::CMYK, turbojpeg::Subsamp::None);
    let out = decode_rgb(&jpeg).unwrap();
    assert_eq!((out.width, out.height), (rgb.width, rgb.height));
    let diff = mean_abs_diff(&out.data, &rgb.data);
    assert!(diff < 2.0, "CMYK decoded {diff} levels away on average");
}

#[test]
fn a_png_named_jpeg_decodes_exactly() {
    let (_, rgb) = a_real_image();
    let mut png = Vec::new();
    let buf =
        image::RgbImage::from_raw(rgb.width as u32, rgb.height as u32, rgb.data.clone()).unwrap();
    buf.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ILSVRC2012_val_00000001.JPEG");
    std::fs::write(&path, png).unwrap();
    assert_eq!(load_rgb(&path).unwrap(), rgb);
}

#[test]
fn truncated_and_garbage_files_are_errors_naming_the_file() {
    let (bytes, _) = a_real_image();
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in [
        ("cut.JPEG", bytes[..bytes.len() / 2].to_vec()),
        ("junk.JPEG", b"not an image at all".to_vec()),
        ("empty.JPEG", vec![]),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        let err = load_rgb(&path).unwrap_err().to_string();
        assert!(err.contains(name) && err.starts_with("cannot decode image"), "{err}");
    }
}

/// The synthetic patterns of `xtask/scripts/pillow_fixtures.py`, repeated here.
fn synthetic(pattern: u32, w: usize, h: usize) -> RgbImage {
    let mut data = vec![0u8; w * h * 3];
    let mut state: u32 = 12345;
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                state = state.wrapping_mul(1103515245).wrapping_add(12345);
                data[(y * w + x) * 3 + c] = match pattern {
                    0 => ((x * 3 + y * 5 + c * 70) % 256) as u8,
                    1 => {
                        if (x / 8 + y / 8 + c) % 2 == 1 {
                            255
                        } else {
                            0
                        }
                    }
                    _ => ((state >> 16) & 255) as u8,
                };
            }
        }
    }
    RgbImage { width: w, height: h, data }
}

/// Pillow 13's `resize(BICUBIC)` output for each synthetic case; ours must be within 1/255 per
/// pixel, and in fact bit-exact.
#[test]
fn resampling_matches_pillow() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pillow_resize.bin"))
            .unwrap();
    let (mut at, mut cases, mut exact_cases) = (0, 0, 0);
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    while at < bytes.len() {
        let (pattern, w, h, ow, oh) =
            (word(at) as u32, word(at + 4), word(at + 8), word(at + 12), word(at + 16));
        at += 20;
        let expected = &bytes[at..at + ow * oh * 3];
        at += ow * oh * 3;
        let ours = resize_bicubic(&synthetic(pattern, w, h), ow, oh);
        let max = ours.data.iter().zip(expected).map(|(&a, &b)| a.abs_diff(b)).max().unwrap();
        let differing = ours.data.iter().zip(expected).filter(|(a, b)| a != b).count();
        println!("pattern {pattern} {w}x{h} -> {ow}x{oh}: {differing} values differ, max {max}");
        assert!(
            max <= 1,
            "pattern {pattern} {w}x{h} -> {ow}x{oh}: max difference {max} (the limit is 1/255)"
        );
        exact_cases += usize::from(differing == 0);
        cases += 1;
    }
    assert_eq!(cases, 16);
    assert_eq!(exact_cases, cases, "every case bit-exact");
}

#[test]
fn preprocessing_geometry_and_normalisation() {
    let img = synthetic(0, 500, 375);
    let vit = resize_and_crop(&img, &Preprocess::VIT);
    assert_eq!((vit.width, vit.height), (224, 224));
    // Short side 248, long int(248·500/375) = 330; crop offsets round((330−224)/2) = 53, 12.
    let resized = resize_bicubic(&img, 330, 248);
    assert_eq!(&vit.data[..224 * 3], &resized.data[(12 * 330 + 53) * 3..(12 * 330 + 53 + 224) * 3]);
    let x = preprocess(&img, &Preprocess::VIT);
    assert_eq!(x.len(), 3 * 224 * 224);
    assert_eq!(x[0], (f32::from(vit.data[0]) / 255.0 - 0.5) / 0.5);
    assert_eq!(x[224 * 224], (f32::from(vit.data[1]) / 255.0 - 0.5) / 0.5, "CHW layout");
    let deit = preprocess(&img, &Preprocess::DEIT);
    let cropped = resize_and_crop(&img, &Preprocess::DEIT);
    assert_eq!(deit[0], (f32::from(cropped.data[0]) / 255.0 - 0.485) / 0.229);
    assert_eq!(Preprocess::DEIT.resize(), 256);
    assert_eq!(Preprocess::VIT.resize(), 248);
}

/// `--holdout`: the development images are a seeded, disjoint part of train/ (one image per
/// class in the shared sample, so disjoint classes too), calibration never sees them, and a
/// calibration larger than what is left is refused.
#[test]
fn the_holdout_is_disjoint_from_calibration_and_seeded() {
    use fqvit_calib::experiment::Calibration;
    use fqvit_calib::{Experiment, calibration_set, train_split};
    let data = common::sample_dir();
    let exp = |holdout, seed, iterations| Experiment {
        calibration: Calibration { holdout, seed, iterations, ..Calibration::default() },
        ..Experiment::default()
    };
    let names = |f: &ImageFolder| -> Vec<String> {
        f.samples().iter().map(|s| s.rel_path.clone()).collect()
    };
    let (pool, dev) = train_split(&data, &exp(500, 0, 5)).unwrap();
    assert_eq!((pool.samples().len(), dev.samples().len()), (500, 500));
    let dev_paths: std::collections::HashSet<_> = names(&dev).into_iter().collect();
    let calib = calibration_set(&data, &exp(500, 0, 5)).unwrap();
    assert_eq!(calib.samples().len(), 500);
    assert!(names(&calib).iter().all(|p| !dev_paths.contains(p)));
    let labels: std::collections::HashSet<_> = dev.samples().iter().map(|s| s.label).collect();
    assert!(pool.samples().iter().all(|s| !labels.contains(&s.label)));
    // The same seed, the same split; another seed, another one; no holdout, all of train.
    assert_eq!(names(&train_split(&data, &exp(500, 0, 5)).unwrap().1), names(&dev));
    assert_ne!(names(&train_split(&data, &exp(500, 1, 5)).unwrap().1), names(&dev));
    assert_eq!(train_split(&data, &exp(0, 0, 10)).unwrap().0.samples().len(), 1000);
    let err = calibration_set(&data, &exp(500, 0, 10)).unwrap_err().to_string();
    assert!(err.contains("needs 1000 images") && err.contains("after holding out 500"), "{err}");
    let err = train_split(&data, &exp(1000, 0, 5)).unwrap_err().to_string();
    assert!(err.contains("--holdout 1000"), "{err}");
}
