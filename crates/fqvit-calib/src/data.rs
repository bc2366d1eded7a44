//! ImageNet folders, preprocessing, and batches decoded in parallel ahead of the model.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use fqvit_models::Preprocess;
use rayon::prelude::*;
use tch::{Device, Tensor};

use crate::decode::load_rgb;
use crate::error::{Error, Result};
use crate::resize::{RgbImage, resize_bicubic};

const CLASSES: &str = include_str!("imagenet_classes.txt");

/// The 1000 ImageNet-1k wnids in class-index order (sorted), with their names.
pub fn classes() -> impl Iterator<Item = (&'static str, &'static str)> {
    CLASSES.lines().map(|l| l.split_once(' ').unwrap_or((l, "")))
}

/// The class index of a wnid: its position in the sorted list of the 1000 ImageNet-1k wnids,
/// so a folder holding a subset of classes still gets the standard labels.
pub fn class_index(wnid: &str) -> Option<usize> {
    classes().position(|(w, _)| w == wnid)
}

/// One image of a split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Path relative to the data root, e.g. `val/n01440764/ILSVRC2012_val_00000293.JPEG`.
    pub rel_path: String,
    /// Class index.
    pub label: usize,
}

/// A split (`train` or `val`) of an ImageNet folder: `<root>/<split>/<wnid>/<file>`, in sorted
/// path order, like torchvision's `ImageFolder` with the canonical class indices.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    samples: Vec<Sample>,
}

impl ImageFolder {
    /// Lists `<root>/<split>`. Fails on a folder that is not an ImageNet-1k wnid, or no images.
    pub fn open(root: &Path, split: &str) -> Result<Self> {
        let dir = root.join(split);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let mut class_dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .map(|e| e.map(|e| e.path()).map_err(io(&dir)))
            .collect::<Result<_>>()?;
        class_dirs.retain(|p| p.is_dir());
        class_dirs.sort();
        let mut samples = Vec::new();
        for class_dir in class_dirs {
            let wnid =
                class_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            let label = class_index(&wnid).ok_or_else(|| Error::UnknownClass {
                path: class_dir.clone(),
                wnid: wnid.clone(),
            })?;
            let mut files: Vec<String> = std::fs::read_dir(&class_dir)
                .map_err(io(&class_dir))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| !name.starts_with('.'))
                .collect();
            files.sort();
            samples.extend(
                files
                    .into_iter()
                    .map(|f| Sample { rel_path: format!("{split}/{wnid}/{f}"), label }),
            );
        }
        if samples.is_empty() {
            return Err(Error::Empty(dir));
        }
        Ok(ImageFolder { root: root.to_owned(), samples })
    }

    /// The data root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The images, in sorted path order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Keeps the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        self.samples.truncate(n);
    }

    /// Keeps the images for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(&Sample) -> bool) {
        self.samples.retain(keep);
    }

    /// Reorders the images with a seeded shuffle ([`shuffle`]).
    pub fn shuffle(&mut self, seed: u64) {
        shuffle(&mut self.samples, seed);
    }
}

/// Fisher–Yates with SplitMix64 seeded by `seed`: `for i in (1..n).rev() { j = next() % (i+1); swap(i, j) }`.
/// Documented so any language can reproduce the calibration set.
pub fn shuffle<T>(xs: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..xs.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        xs.swap(i, j);
    }
}

/// Resize the short side to `⌊224/crop_pct⌋` (Pillow bicubic), centre crop, scale to [0, 1] and
/// normalize, as the original's `build_transform` (spec §9). Returns CHW float32.
pub fn preprocess(img: &RgbImage, pp: &Preprocess) -> Vec<f32> {
    let cropped = resize_and_crop(img, pp);
    let size = pp.size as usize;
    let mut out = vec![0f32; 3 * size * size];
    for (i, px) in cropped.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            // torchvision: ToTensor divides by 255, Normalize subtracts and divides, in float32.
            out[c * size * size + i] = (f32::from(px[c]) / 255.0 - pp.mean[c]) / pp.std[c];
        }
    }
    out
}

/// The uint8 image after resize and centre crop (before normalisation).
pub fn resize_and_crop(img: &RgbImage, pp: &Preprocess) -> RgbImage {
    let short = pp.resize() as usize;
    let (w, h) = (img.width, img.height);
    // torchvision `_compute_resized_output_size`: the long side is int(short · long / short_in).
    let long = |l: usize, s: usize| (short as f64 * l as f64 / s as f64) as usize;
    let (nw, nh) = if w <= h { (short, long(h, w)) } else { (long(w, h), short) };
    let resized = if (nw, nh) == (w, h) { img.clone() } else { resize_bicubic(img, nw, nh) };
    let size = pp.size as usize;
    // torchvision `center_crop`: int(round((h − size) / 2)), Python's round (half to even).
    let offset = |total: usize| ((total as f64 - size as f64) / 2.0).round_ties_even() as usize;
    let (top, left) = (offset(nh), offset(nw));
    let mut data = Vec::with_capacity(size * size * 3);
    for y in top..top + size {
        data.extend_from_slice(&resized.data[(y * nw + left) * 3..(y * nw + left + size) * 3]);
    }
    RgbImage { width: size, height: size, data }
}

/// One batch: images `(B, 3, 224, 224)` on the device, their samples, and the images skipped.
#[derive(Debug)]
pub struct Batch {
    /// The normalized images.
    pub images: Tensor,
    /// The samples they came from, in order.
    pub samples: Vec<Sample>,
}

/// What to do with an image that cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BadImages {
    /// Stop with an error naming the file.
    #[default]
    Fail,
    /// Skip it with a warning, and count it.
    Skip,
}

/// Decodes and preprocesses batches in parallel (rayon), one batch ahead of the consumer.
///
/// `f` receives each batch in order; skipped images are reported through `skipped`.
pub fn for_each_batch(
    folder: &ImageFolder,
    pp: &Preprocess,
    batch_size: usize,
    device: Device,
    bad: BadImages,
    skipped: &mut Vec<String>,
    mut f: impl FnMut(Batch) -> Result<()>,
) -> Result<()> {
    let size = pp.size as i64;
    let chunks: Vec<&[Sample]> = folder.samples.chunks(batch_size.max(1)).collect();
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = mpsc::sync_channel::<Result<(Vec<f32>, Vec<Sample>, Vec<String>)>>(1);
        scope.spawn(move || {
            for chunk in chunks {
                let decoded: Vec<(Sample, Result<Vec<f32>>)> = chunk
                    .par_iter()
                    .map(|s| {
                        (
                            s.clone(),
                            load_rgb(&folder.root.join(&s.rel_path))
                                .map(|img| preprocess(&img, pp)),
                        )
                    })
                    .collect();
                let mut pixels = Vec::with_capacity(decoded.len() * 3 * (size * size) as usize);
                let (mut samples, mut bad_paths) = (Vec::new(), Vec::new());
                let mut failure = None;
                for (sample, res) in decoded {
                    match res {
                        Ok(p) => {
                            pixels.extend_from_slice(&p);
                            samples.push(sample);
                        }
                        Err(e) if bad == BadImages::Skip => {
                            tracing::warn!("skipping {}: {e}", sample.rel_path);
                            bad_paths.push(sample.rel_path);
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                let msg = match failure {
                    Some(e) => Err(e),
                    None => Ok((pixels, samples, bad_paths)),
                };
                let stop = msg.is_err();
                if tx.send(msg).is_err() || stop {
                    return;
                }
            }
        });
        for msg in rx {
            let (pixels, samples, bad_paths) = msg?;
            skipped.extend(bad_paths);
            if samples.is_empty() {
                continue;
            }
            let images = Tensor::from_slice(&pixels)
                .view([samples.len() as i64, 3, size, size])
                .to_device(device);
            f(Batch { images, samples })?;
        }
        Ok(())
    })
}
