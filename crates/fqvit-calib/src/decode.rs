//! Decoding an image file to RGB as Pillow's `Image.open(f).convert("RGB")` does.
//!
//! JPEG goes through libjpeg-turbo (the decoder in Pillow's wheels) with its defaults: accurate
//! integer IDCT and fancy upsampling. The content decides the format, not the extension (real
//! ImageNet has PNGs named `.JPEG`). Grayscale is replicated to RGB; CMYK follows Pillow: Adobe
//! inverted codes, then `R = 255 − K' ...` as `cmyk2rgb` in Pillow's `Convert.c`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::resize::RgbImage;

/// Reads and decodes an image file to RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    decode_rgb(&bytes).map_err(|reason| Error::BadImage { path: path.to_owned(), reason })
}

/// Decodes image bytes to RGB, naming what went wrong on failure.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        decode_jpeg(bytes)
    } else {
        let img = image::load_from_memory(bytes).map_err(|e| format!("not a JPEG, and {e}"))?;
        let rgb = img.to_rgb8();
        Ok(RgbImage {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            data: rgb.into_raw(),
        })
    }
}

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let mut dec = turbojpeg::Decompressor::new().map_err(|e| e.to_string())?;
    let header = dec.read_header(bytes).map_err(|e| format!("bad JPEG header: {e}"))?;
    let (width, height) = (header.width, header.height);
    let cmyk =
        matches!(header.colorspace, turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK);
    let format = if cmyk { turbojpeg::PixelFormat::CMYK } else { turbojpeg::PixelFormat::RGB };
    let channels = format.size();
    let mut pixels = vec![0u8; width * height * channels];
    let image = turbojpeg::Image {
        pixels: pixels.as_mut_slice(),
        width,
        pitch: width * channels,
        height,
        format,
    };
    // libjpeg-turbo reports a truncated or corrupt stream as an error; Pillow's
    // LOAD_TRUNCATED_IMAGES is off by default, so it refuses them too.
    dec.decompress(bytes, image).map_err(|e| format!("corrupt or truncated JPEG: {e}"))?;
    let data = if cmyk { cmyk_to_rgb(&pixels) } else { pixels };
    Ok(RgbImage { width, height, data })
}

/// Pillow's CMYK JPEG path: codes are read as Adobe-inverted (`CMYK;I`), then `cmyk2rgb`.
fn cmyk_to_rgb(raw: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(raw.len() / 4 * 3);
    for px in raw.chunks_exact(4) {
        let nk = i32::from(px[3]); // 255 − (255 − k): the inversion cancels
        for &v in &px[..3] {
            let c = 255 - i32::from(v);
            out.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    out
}
