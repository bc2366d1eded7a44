//! Uniform quantization on slices (spec §4.1), round half to even as `torch.round`.
//!
//! All arithmetic is float32 in the original's order (`x / s + z`, then round, then clamp), so
//! codes match it exactly.

use crate::bits::BitType;

/// `clamp(round(x / s + z), lower, upper)`, round half to even.
#[inline]
pub fn quantize(x: f32, scale: f32, zero_point: i32, bit_type: BitType) -> i32 {
    // Clamp in float first: x / s can exceed the i32 range (or be NaN, which clamps to the lower bound).
    let q = (x / scale + zero_point as f32).round_ties_even();
    let q = q.clamp(bit_type.lower() as f32, bit_type.upper() as f32);
    if q.is_nan() { bit_type.lower() } else { q as i32 }
}

/// `(q − z) · s`.
#[inline]
pub fn dequantize(q: i32, scale: f32, zero_point: i32) -> f32 {
    (q - zero_point) as f32 * scale
}

/// Where the channel of a tensor lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelAxis {
    /// Activations `(…, C)`: the channel varies fastest.
    Last,
    /// Weights `(C_out, …)`: one contiguous row per channel.
    First,
}

/// Quantizes `xs` into `codes` with one scale and zero point, or one per channel.
///
/// # Panics
/// If `codes` and `xs` differ in length, if `scale` and `zero_point` are not both of length 1
/// or both of the channel count, or if the length is not a multiple of the channel count.
#[track_caller]
pub fn quantize_slice(
    xs: &[f32],
    scale: &[f32],
    zero_point: &[i32],
    bit_type: BitType,
    axis: ChannelAxis,
    codes: &mut [i32],
) {
    assert_eq!(xs.len(), codes.len(), "quantize_slice: input and output lengths differ");
    for_each_channel(xs.len(), scale.len(), zero_point.len(), axis, |range, c| {
        let (s, z) = (scale[c.min(scale.len() - 1)], zero_point[c.min(zero_point.len() - 1)]);
        for i in range {
            codes[i] = quantize(xs[i], s, z, bit_type);
        }
    });
}

/// Quantizes then dequantizes in place (the original's fake quantization).
///
/// # Panics
/// As [`quantize_slice`].
#[track_caller]
pub fn fake_quantize_slice(
    xs: &mut [f32],
    scale: &[f32],
    zero_point: &[i32],
    bit_type: BitType,
    axis: ChannelAxis,
) {
    let len = xs.len();
    for_each_channel(len, scale.len(), zero_point.len(), axis, |range, c| {
        let (s, z) = (scale[c.min(scale.len() - 1)], zero_point[c.min(zero_point.len() - 1)]);
        for x in &mut xs[range] {
            *x = dequantize(quantize(*x, s, z, bit_type), s, z);
        }
    });
}

/// Calls `f(range, channel)` over runs of elements sharing a channel.
#[track_caller]
fn for_each_channel(
    len: usize,
    n_scales: usize,
    n_zero_points: usize,
    axis: ChannelAxis,
    mut f: impl FnMut(std::ops::Range<usize>, usize),
) {
    let n_channels = n_scales.max(n_zero_points);
    assert!(
        n_scales >= 1
            && n_zero_points >= 1
            && (n_scales == 1 || n_scales == n_channels)
            && (n_zero_points == 1 || n_zero_points == n_channels),
        "quantization parameters: {n_scales} scales and {n_zero_points} zero points do not broadcast"
    );
    if n_channels == 1 {
        f(0..len, 0);
        return;
    }
    assert!(
        len.is_multiple_of(n_channels),
        "{len} elements are not a multiple of {n_channels} channels"
    );
    match axis {
        ChannelAxis::Last => {
            for start in (0..len).step_by(n_channels) {
                for c in 0..n_channels {
                    f(start + c..start + c + 1, c);
                }
            }
        }
        ChannelAxis::First => {
            let row = len / n_channels;
            for c in 0..n_channels {
                f(c * row..(c + 1) * row, c);
            }
        }
    }
}

/// The symmetric int8 weight scale of one output channel: `max(max|w|, ·) / 127.5`, at least ε.
///
/// The denominator is `(upper − lower) / 2 = 127.5`, not 127 (spec §4.1, §12.2): the positive
/// extreme rounds to 128 and clips to 127.
pub fn symmetric_scale(min_val: f32, max_val: f32, bit_type: BitType) -> f32 {
    let m = (-min_val).max(max_val);
    (m / (bit_type.span() as f32 / 2.0)).max(f32::EPSILON)
}

/// The asymmetric scale and zero point from a range (spec §3.2):
/// `s = max((max − min) / span, ε)`, `z = clamp(lower − round(min / s), lower, upper)`.
pub fn asymmetric_params(min_val: f32, max_val: f32, bit_type: BitType) -> (f32, i32) {
    let scale = ((max_val - min_val) / bit_type.span() as f32).max(f32::EPSILON);
    let z = (bit_type.lower() as f32 - (min_val / scale).round_ties_even())
        .clamp(bit_type.lower() as f32, bit_type.upper() as f32);
    (scale, z as i32)
}
