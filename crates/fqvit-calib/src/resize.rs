//! Pillow's resampling, bit for bit (`Image.resize(size, BICUBIC)` on an RGB image).
//!
//! A port of Pillow's `libImaging/Resample.c` (8 bits per channel): separable convolution,
//! horizontal pass first over only the rows the vertical pass needs, float64 filter weights
//! normalised per output pixel, then converted to 22-bit fixed point with round-half-away, and
//! `clip8` of the rounded accumulator. The support widens by the scale factor when downscaling,
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
    let mut vert = precompute_coeffs(img.height, height);
    // Only the source rows the vertical pass reads go through the horizontal pass.
    let first = vert.bounds[0].0;
    let last = vert.bounds[height - 1].0 + vert.bounds[height - 1].1;
    let mut cur = if need_h {
        for b in &mut vert.bounds {
            b.0 -= first;
        }
        let rows = last - first;
        let mut out = vec![0u8; width * rows * 3];
        for y in 0..rows {
            let src = &img.data[(y + first) * img.width * 3..(y + first + 1) * img.width * 3];
            let dst = &mut out[y * width * 3..(y + 1) * width * 3];
            for (xx, &(xmin, xmax)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..];
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
    } else {
        img.clone()
    };
    if need_v {
        let w = cur.width;
        let mut out = vec![0u8; w * height * 3];
        for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
            let k = &vert.weights[yy * vert.ksize..];
            let dst = &mut out[yy * w * 3..(yy + 1) * w * 3];
            for (i, d) in dst.iter_mut().enumerate() {
                let mut ss = 1i32 << (PRECISION_BITS - 1);
                for y in 0..ymax {
                    ss += i32::from(cur.data[(y + ymin) * w * 3 + i]) * k[y];
                }
                *d = clip8(ss);
            }
        }
        cur = RgbImage { width: w, height, data: out };
    }
    cur
}
