//! A site's grid as the artifact stores it: scale(s), zero point(s), PTF factors.

use crate::artifact::Artifact;
use crate::error::Result;

/// One activation site's quantization grid, layer-wise (one entry) or per channel.
#[derive(Clone, Debug)]
pub(crate) struct Grid {
    pub(crate) name: String,
    pub(crate) scale: Vec<f32>,
    pub(crate) zero_point: Vec<i32>,
    pub(crate) ptf: Option<Vec<u8>>,
}

impl Grid {
    pub(crate) fn read(art: &Artifact, site: &str) -> Result<Self> {
        let scale = art.f32(&format!("{site}.scale"), None)?;
        let zero_point = art.i32(&format!("{site}.zero_point"), None)?;
        let ptf_name = format!("{site}.ptf_factor");
        let ptf =
            if art.has(&ptf_name) { Some(art.u8(&ptf_name, Some(&[scale.len()]))?) } else { None };
        if scale.is_empty() || !(zero_point.len() == 1 || zero_point.len() == scale.len()) {
            return Err(art.bad(format!(
                "site {site} has {} scales and {} zero points",
                scale.len(),
                zero_point.len()
            )));
        }
        if let Some(s) = scale.iter().find(|s| s.is_nan() || **s <= 0.0) {
            return Err(art.bad(format!("site {site} has scale {s}, not positive")));
        }
        if let Some(z) = zero_point.iter().find(|z| !(0..=255).contains(*z)) {
            return Err(art.bad(format!("site {site} has zero point {z}, not a uint8 code")));
        }
        Ok(Grid { name: site.to_owned(), scale, zero_point, ptf })
    }

    /// Whether the site has one scale and zero point.
    pub(crate) fn layer_wise(&self) -> bool {
        self.scale.len() == 1 && self.zero_point.len() == 1
    }

    pub(crate) fn scale(&self, c: usize) -> f32 {
        self.scale[if self.scale.len() == 1 { 0 } else { c }]
    }

    pub(crate) fn zero_point(&self, c: usize) -> i32 {
        self.zero_point[if self.zero_point.len() == 1 { 0 } else { c }]
    }

    /// Fits a tensor of `channels` channels (one entry or one per channel).
    pub(crate) fn fits(&self, channels: usize) -> bool {
        (self.scale.len() == 1 || self.scale.len() == channels)
            && (self.zero_point.len() == 1 || self.zero_point.len() == channels)
    }

    /// The grid of `times` side-by-side copies of a tensor on this one, channels tiled.
    pub(crate) fn tiled(&self, times: usize) -> Grid {
        fn tile<T: Copy>(v: &[T], times: usize) -> Vec<T> {
            if v.len() == 1 { v.to_vec() } else { v.repeat(times) }
        }
        Grid {
            name: self.name.clone(),
            scale: tile(&self.scale, times),
            zero_point: tile(&self.zero_point, times),
            ptf: self.ptf.as_ref().map(|p| p.repeat(times)),
        }
    }
}
