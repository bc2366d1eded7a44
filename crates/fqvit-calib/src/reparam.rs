//! `reparam-norm-out` (fqvit+): RepQ-ViT's scale reparameterization of the post-LayerNorm
//! activations, before calibration. The outputs of `norm1` and `norm2` in every block vary
//! widely between channels, so one layer-wise grid fits most channels badly. A first float pass
//! over the calibration images takes each channel's range `[min_c, max_c]` at the input of the
//! linear layer that reads it (qkv, fc1); with the per-channel grid `s_c = (max_c − min_c)/(2^b
//! − 1)`, `z_c = −min_c/s_c` and their means `s̃`, `z̃`, the LayerNorm's output channel `c`
//! becomes `(x_c + s_c·(z_c − z̃))/(s_c/s̃)` and the linear layer absorbs the inverse
//! ([`fqvit_models::quant::LayerNorm::fold_into`]), so the float network is unchanged (to rounding)
//! while a layer-wise grid on the new outputs acts as the per-channel one on the old. The
//! model's parameters change in place; the calibration that follows, the weights' quantization,
//! the artifact and the integer engine see only ordinary γ, β, W and b.

use fqvit_models::quant::{LayerNorm, Linear};
use fqvit_models::{CalibrationSink, Classifier, Layer, Mode, QuantOptions, SiteId};
use fqvit_ops::QParams;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// The ratio `s_c/s̃` is kept within `[1/RATIO, RATIO]`, so that a near-constant or dead channel
/// cannot scale γ and β without bound (the fold stays exact at any ratio; only the balance of
/// the grid is given up there).
const RATIO: f64 = 100.0;

/// Which LayerNorm outputs are reparameterized: each block's, where a linear layer with a bias
/// reads them directly.
fn pairs(model: &dyn Classifier) -> Vec<(&LayerNorm, &Linear)> {
    let sites = model.sites();
    let layers = model.layers();
    layers
        .windows(2)
        .filter_map(|w| match (w[0], w[1]) {
            (Layer::LayerNorm(ln), Layer::Linear(l)) => {
                let name = &sites.get(ln.out_site()).name;
                let block = name.ends_with("norm1_out") || name.ends_with("norm2_out");
                (block && model.bias(l.site()).is_some()).then_some((ln, l))
            }
            _ => None,
        })
        .collect()
}

/// The first pass: each reparameterized site's per-channel range, by the weight site of the
/// linear layer that reads it. Every other site is left alone and nothing freezes, so the pass
/// is the float forward.
pub struct NormOutRanges {
    /// Per weight site: the running `(min, max)` over tokens, `(C,)` each.
    ranges: Vec<Option<Option<(Tensor, Tensor)>>>,
}

impl NormOutRanges {
    /// Ranges for `model`'s reparameterized sites.
    pub fn new(model: &dyn Classifier) -> Self {
        let mut ranges: Vec<Option<Option<(Tensor, Tensor)>>> =
            (0..model.sites().len()).map(|_| None).collect();
        for (_, l) in pairs(model) {
            ranges[l.site().index()] = Some(None);
        }
        NormOutRanges { ranges }
    }

    /// One batch of normalized `images` through `model`, in float.
    pub fn batch(&mut self, model: &dyn Classifier, images: &Tensor, options: QuantOptions) {
        let _logits =
            tch::no_grad(|| model.forward(images, &mut Mode::Calibrate { sink: self, options }));
    }

    /// Each observed site's per-channel span `max − min`, in forward order.
    pub fn spans(&self) -> Vec<Tensor> {
        self.ranges.iter().flatten().flatten().map(|(lo, hi)| hi - lo).collect()
    }

    /// Folds the ranges into `model` for codes of `bits` bits; returns how many LayerNorms
    /// changed.
    ///
    /// # Errors
    /// [`Error::Reparam`] naming the site whose range is missing or not finite; then no
    /// parameter has changed.
    pub fn fold(self, model: &dyn Classifier, bits: u8) -> Result<usize> {
        let sites = model.sites();
        let span = f64::from((1u32 << bits) - 1);
        let mut folds = Vec::new();
        for (ln, l) in pairs(model) {
            let name = &sites.get(ln.out_site()).name;
            let bad = |reason: &str| Error::Reparam { site: name.clone(), reason: reason.into() };
            let Some(Some((lo, hi))) = &self.ranges[l.site().index()] else {
                return Err(bad("never observed"));
            };
            let (lo, hi) = (lo.to_kind(Kind::Double), hi.to_kind(Kind::Double));
            let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) == 1;
            if !finite(&lo) || !finite(&hi) {
                return Err(bad("its range is not finite (NaN inputs or weights)"));
            }
            // The per-channel grid, its zero point unrounded; an empty range gets the smallest
            // step, as the observers give it.
            let s = ((&hi - &lo) / span).clamp_min(f64::from(f32::EPSILON));
            let z = -&lo / &s;
            let (s_mean, z_mean) = (s.mean(Kind::Double), z.mean(Kind::Double));
            let ratio = (&s / &s_mean).clamp(1.0 / RATIO, RATIO);
            let shift = &s * (&z - &z_mean);
            folds.push((ln, l, ratio, shift, name));
        }
        let count = folds.len();
        for (ln, l, ratio, shift, name) in folds {
            ln.fold_into(l, &ratio, &shift)
                .map_err(|e| Error::Reparam { site: name.clone(), reason: e.to_string() })?;
            tracing::debug!(site = %name, max_ratio = ratio.max().double_value(&[]), "reparameterized");
        }
        Ok(count)
    }
}

impl CalibrationSink for NormOutRanges {
    fn observe(&mut self, _site: SiteId, _xs: &Tensor) {}

    fn observe_input(&mut self, site: SiteId, xs: &Tensor) {
        let Some(Some(slot)) = self.ranges.get_mut(site.index()) else { return };
        let c = *xs.size().last().unwrap_or(&1);
        let rows = xs.reshape([-1, c]);
        let (lo, hi) = (rows.amin([0i64].as_slice(), false), rows.amax([0i64].as_slice(), false));
        *slot = Some(match slot.take() {
            Some((l, h)) => (l.minimum(&lo), h.maximum(&hi)),
            None => (lo, hi),
        });
    }

    fn frozen(&self, _site: SiteId) -> Option<&QParams> {
        None
    }
}
