//! Pillow's resampling, bit for bit (`Image.resize(size, BICUBIC)` on an RGB image).
//!
//! A port of Pillow 12/13's `libImaging/Resample.c` (8 bits per channel): separable
//! convolution, float64 filter weights normalised per output pixel, then converted to 22-bit
//! fixed point with round-half-away, and `clip8` of the rounded accumulator. The horizontal pass
//! runs first (over only the rows the vertical pass needs), except when the height shrinks by more
//! than twice as many pixels as the width: then the vertical pass runs first, as Pillow ≥ 12 does.
//! The order changes the intermediate rounding, by up to several levels on steep gradients. The support widens by the scale factor when downscaling,
//! which is Pillow's antialiasing. No crate reproduces this exactly (checked against Pillow's own
//! output in `tests/preprocess.rs`).

/// An 8-bit RGB image, row-major, interleaved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width · height · 3` bytes.
    pub data: Vec<u8>,
}

/// Pillow's `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel, a = −0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input index and the fixed-point weights (`precompute_coeffs`
/// then `normalize_coeffs_8bpc`).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; the clamp makes negatives 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for x in 0..xmax {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for x in 0..xmax {
            if ww != 0.0 {
                k[x] /= ww;
            }
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..xmax {
            let v = k[x] * f64::from(1u32 << PRECISION_BITS);
            row[x] = if k[x] < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { bounds, ksize, weights }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= 1 << PRECISION_BITS << 8 {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes to `width × height` exactly as Pillow's `Image.resize(..., Image.BICUBIC)`.
///
/// # Panics
/// If a side of the input or output is 0, or the data length is not `width · height · 3`.
#[track_caller]
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    assert!(img.width > 0 && img.height > 0 && width > 0 && height > 0, "resize: empty image");
    assert_eq!(
        img.data.len(),
        img.width * img.height * 3,
        "resize: data is not width · height · 3 bytes"
    );
    let need_h = width != img.width;
    let need_v = height != img.height;
    let horiz = precompute_coeffs(img.width, width);
    let vert = precompute_coeffs(img.height, height);
    // Pillow ≥ 12: "if height is being scaled down more than twice the amount the width is, run
    // the vertical pass first, to make the horizontal pass faster".
    let shrink_h = img.height as i64 - height as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > (img.width as i64 - width as i64) * 2);
    if horizontal_first {
        let mut cur = img.clone();
        if need_h {
            // Only the source rows the vertical pass reads go through the horizontal pass.
            let first = vert.bounds[0].0;
            let last = vert.bounds[height - 1].0 + vert.bounds[height - 1].1;
            cur = horizontal_pass(img, &horiz, first, last - first);
        }
        if need_v {
            let shift = if need_h { vert.bounds[0].0 } else { 0 };
            cur = vertical_pass(&cur, &vert, shift);
        }
        cur
    } else {
        let mut cur = if need_v { vertical_pass(img, &vert, 0) } else { img.clone() };
        if need_h {
            cur = horizontal_pass(&cur, &horiz, 0, cur.height);
        }
        cur
    }
}

/// `ImagingResampleHorizontal_8bpc` over `rows` source rows starting at `offset`.
fn horizontal_pass(img: &RgbImage, coeffs: &Coeffs, offset: usize, rows: usize) -> RgbImage {
    let width = coeffs.bounds.len();
    let mut out = vec![0u8; width * rows * 3];
    for y in 0..rows {
        let src = &img.data[(y + offset) * img.width * 3..(y + offset + 1) * img.width * 3];
        let dst = &mut out[y * width * 3..(y + 1) * width * 3];
        for (xx, &(xmin, xmax)) in coeffs.bounds.iter().enumerate() {
            let k = &coeffs.weights[xx * coeffs.ksize..];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for x in 0..xmax {
                let p = &src[(x + xmin) * 3..(x + xmin) * 3 + 3];
                for c in 0..3 {
                    ss[c] += i32::from(p[c]) * k[x];
                }
            }
            for c in 0..3 {
                dst[xx * 3 + c] = clip8(ss[c]);
            }
        }
    }
    RgbImage { width, height: rows, data: out }
}

/// `ImagingResampleVertical_8bpc`; `shift` is subtracted from each window start (the first
/// source row of a horizontal pass that skipped unused rows).
fn vertical_pass(img: &RgbImage, coeffs: &Coeffs, shift: usize) -> RgbImage {
    let (w, height) = (img.width, coeffs.bounds.len());
    let mut out = vec![0u8; w * height * 3];
    for (yy, &(ymin, ymax)) in coeffs.bounds.iter().enumerate() {
        let ymin = ymin - shift;
        let k = &coeffs.weights[yy * coeffs.ksize..];
        let dst = &mut out[yy * w * 3..(yy + 1) * w * 3];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for y in 0..ymax {
                ss += i32::from(img.data[(y + ymin) * w * 3 + i]) * k[y];
            }
            *d = clip8(ss);
        }
    }
    RgbImage { width: w, height, data: out }
}
