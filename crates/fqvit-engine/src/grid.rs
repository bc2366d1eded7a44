//! A site's grid as the artifact stores it: scale(s), zero point(s), PTF factors.

use crate::error::Result;
use fqvit_artifact::Artifact;
use fqvit_ops::{BitType, PtfFactor};

/// One activation site's quantization grid, layer-wise (one entry) or per channel.
#[derive(Clone, Debug)]
pub(crate) struct Grid {
    pub(crate) name: String,
    pub(crate) scale: Vec<f32>,
    pub(crate) zero_point: Vec<i32>,
    pub(crate) ptf: Option<Vec<PtfFactor>>,
    /// Its code type: activations are unsigned, of up to 8 bits but for the residual stream
    /// (up to 15, the reader checked; `ops::compile` checks which ops read and write them).
    pub(crate) bit_type: BitType,
}

impl Grid {
    /// The grid of `site`, whose codes must be bytes (where the engine takes nothing wider).
    pub(crate) fn read(art: &Artifact, site: &str) -> Result<Self> {
        let g = Grid::read_any(art, site)?;
        if !g.bytes() {
            let bits = g.bit_type.bits.get();
            return Err(art
                .bad(format!("site {site} has {bits}-bit codes where bytes are read"))
                .into());
        }
        Ok(g)
    }

    /// The grid of `site`, as the artifact's reader checked it: bytes, or up to 15 bits on the
    /// residual stream (for the ops that write it, `ops::check_widths`).
    pub(crate) fn read_any(art: &Artifact, site: &str) -> Result<Self> {
        let p = art
            .params(site)
            .ok_or_else(|| art.bad(format!("has no parameters for site {site}")))?;
        Ok(Grid {
            name: site.to_owned(),
            bit_type: p.bit_type,
            scale: p.scale.clone(),
            zero_point: p.zero_point.clone(),
            ptf: p.ptf.clone(),
        })
    }

    /// Its largest code, for a site of bytes ([`Grid::read`]).
    pub(crate) fn hi(&self) -> u8 {
        debug_assert!(self.bytes(), "site {} is wider than a byte", self.name);
        self.bit_type.upper() as u8
    }

    /// Its largest code, for any site (unsigned, up to 15 bits: the reader checked).
    pub(crate) fn hi_wide(&self) -> u16 {
        self.bit_type.upper() as u16
    }

    /// Whether its codes are bytes.
    pub(crate) fn bytes(&self) -> bool {
        self.bit_type.bits.fits_byte()
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
            bit_type: self.bit_type,
        }
    }
}
