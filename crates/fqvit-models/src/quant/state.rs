//! The frozen state of a quantized model: everything the quantized forward needs, prepared on
//! the model's device once, when the state is built.

use fqvit_ops::softmax::{ExpShift, LisConstants, MIN_SCALE};
use fqvit_tensor::{Axis, IntLayerNorm, LayerNormInput, LogIntSoftmax, Quantizer};
use tch::Tensor;

use super::{Layer, Quantizable};
use crate::error::{Error, Result};
use crate::mode::QuantOptions;
use crate::site::{QParamTable, SiteId, SiteTable, TensorClass};

/// What one site needs at run time.
#[derive(Debug)]
enum SiteState {
    /// Unused (the uniform softmax quantizer under LIS).
    Unused,
    /// A weight site: the fake-quantized weight (the original recomputes identical ones every
    /// call).
    Weight(Tensor),
    /// An activation site: its quantizer.
    Act(Quantizer),
    /// An activation site left in float (`QuantOptions::float_sites`): the identity.
    Float,
}

/// A model's frozen quantization state: the parameter table, the options, and per site, per
/// integer LayerNorm and per Log-Int-Softmax the constants of the forward on the model's device.
#[derive(Debug)]
pub struct Quantized {
    table: QParamTable,
    options: QuantOptions,
    sites: SiteTable,
    states: Vec<SiteState>,
    /// Integer LayerNorms, by their output site.
    layer_norms: Vec<Option<IntLayerNorm>>,
    /// Log-Int-Softmaxes, by their (unused) output site.
    softmaxes: Vec<Option<LogIntSoftmax>>,
}

impl Quantized {
    /// Checks `table` against the model's sites and prepares the quantized forward.
    ///
    /// Fails, naming the site, when a used site has no parameters, the wrong number of
    /// channels, or (with integer LayerNorm) a LayerNorm input that is neither layer-wise nor PTF.
    pub fn new(model: &dyn Quantizable, table: QParamTable, options: QuantOptions) -> Result<Self> {
        let sites = model.sites().clone();
        if table.len() != sites.len() {
            return Err(Error::Site {
                site: "*".into(),
                reason: format!("the table has {} sites, the model {}", table.len(), sites.len()),
            });
        }
        let device = model.device();
        let mut states = Vec::with_capacity(sites.len());
        for (id, site) in sites.iter() {
            let bad = |reason: String| Error::Site { site: site.name.clone(), reason };
            let float = options.float_sites.contains(site);
            let used = !(site.class == TensorClass::Softmax && options.lis_bits.is_some());
            if float && site.class != TensorClass::Weight {
                states.push(SiteState::Float);
                continue;
            }
            let Some(params) = table.get(id).filter(|_| used) else {
                if used {
                    return Err(bad("has no calibrated parameters".into()));
                }
                states.push(SiteState::Unused);
                continue;
            };
            let n = params.scale.len();
            if params.zero_point.len() != n && params.zero_point.len() != 1 {
                return Err(bad(format!("{n} scales but {} zero points", params.zero_point.len())));
            }
            if params.scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(bad("has a scale that is not positive and finite".into()));
            }
            if site.class == TensorClass::Weight {
                if n != site.channels {
                    return Err(bad(format!(
                        "{n} weight scales for {} output channels",
                        site.channels
                    )));
                }
                let w =
                    model.weight(id).ok_or_else(|| bad("is not a weight of this model".into()))?;
                let w = if float {
                    w.shallow_clone()
                } else {
                    let q = Quantizer::new(params, Axis::First, w.device());
                    tch::no_grad(|| q.fake_quant(w))
                };
                states.push(SiteState::Weight(w));
                continue;
            }
            if n != 1 && n != site.channels {
                return Err(bad(format!("{n} scales for {} channels", site.channels)));
            }
            if options.int_layer_norm
                && site.class == TensorClass::LayerNormInput
                && n != 1
                && params.ptf.is_none()
            {
                return Err(bad(
                    "feeds an integer LayerNorm but is channel-wise without PTF factors".into(),
                ));
            }
            states.push(SiteState::Act(Quantizer::new(params, Axis::Last, device)));
        }
        let mut layer_norms: Vec<Option<IntLayerNorm>> = (0..sites.len()).map(|_| None).collect();
        let mut softmaxes: Vec<Option<LogIntSoftmax>> = (0..sites.len()).map(|_| None).collect();
        let is_float = |id: SiteId| matches!(states[id.index()], SiteState::Float);
        for layer in model.layers() {
            match layer {
                // A float input or output leaves the LayerNorm in float too.
                Layer::LayerNorm(ln) if is_float(ln.in_site) || is_float(ln.out_site) => {}
                Layer::LayerNorm(ln) if options.int_layer_norm => {
                    let p_in = table.require(ln.in_site, &sites)?;
                    let p_out = table.require(ln.out_site, &sites)?;
                    let name = |id: SiteId| sites.get(id).name.clone();
                    if p_out.scale.len() != 1 {
                        return Err(Error::Site {
                            site: name(ln.out_site),
                            reason: "follows an integer LayerNorm but is not layer-wise".into(),
                        });
                    }
                    let channels = ln.weight.size()[0] as usize;
                    let expand = ln.in_expand as usize;
                    if p_in.scale.len() != 1 && p_in.scale.len() * expand != channels {
                        return Err(Error::Site {
                            site: name(ln.in_site),
                            reason: format!(
                                "{} scales ×{expand} for a LayerNorm of {channels} channels",
                                p_in.scale.len()
                            ),
                        });
                    }
                    let input = LayerNormInput { params: p_in, expand };
                    let built = tch::no_grad(|| {
                        IntLayerNorm::new(
                            &ln.weight,
                            &ln.bias,
                            input,
                            p_out.scale[0],
                            options.std_sqrt,
                        )
                    });
                    let built = built.map_err(|e| Error::Site {
                        site: name(ln.out_site),
                        reason: e.to_string(),
                    })?;
                    layer_norms[ln.out_site.index()] = Some(built);
                }
                // A float softmax output replaces Log-Int-Softmax by the float softmax.
                Layer::Softmax(s) if is_float(s.out_site()) => {}
                Layer::Softmax(s) => {
                    if let Some(bits) = options.lis_bits {
                        let wiring = s.wiring();
                        let p_in = table.require(wiring.in_site, &sites)?;
                        let (scale, shift) = (p_in.scale[0], options.lis_exp_shift);
                        // The original's grid takes any scale (in float32); a finer one is
                        // for the integer engine, which needs `S·2^-K ≥ 2^-10`.
                        if shift != ExpShift::NONE
                            && !LisConstants::shifted(scale, shift).fit_integers()
                        {
                            return Err(Error::Site {
                                site: sites.get(wiring.in_site).name.clone(),
                                reason: format!(
                                    "scale {scale} shifted by lis-exp-shift {shift} is below \
                                     Log-Int-Softmax's integer bound {MIN_SCALE}: lower the shift"
                                ),
                            });
                        }
                        softmaxes[s.out_site().index()] = Some(
                            LogIntSoftmax::new(scale, bits, device)
                                .with_exp_shift(shift)
                                .with_input(options.lis_input),
                        );
                    }
                }
                _ => {}
            }
        }
        Ok(Quantized { table, options, sites, states, layer_norms, softmaxes })
    }

    /// The parameter table.
    pub fn table(&self) -> &QParamTable {
        &self.table
    }

    /// The options.
    pub fn options(&self) -> QuantOptions {
        self.options
    }

    /// The original's module name of a site.
    pub(crate) fn module_name(&self, site: SiteId) -> &str {
        &self.sites.get(site).original
    }

    pub(crate) fn fake_quant(&self, site: SiteId, xs: &Tensor) -> Tensor {
        match &self.states[site.index()] {
            SiteState::Act(q) => q.fake_quant(xs),
            SiteState::Float => xs.shallow_clone(),
            _ => panic!("site {} has no activation parameters", self.sites.get(site).name),
        }
    }

    pub(crate) fn weight(&self, site: SiteId) -> &Tensor {
        match &self.states[site.index()] {
            SiteState::Weight(w) => w,
            _ => panic!("site {} has no weight", self.sites.get(site).name),
        }
    }

    /// The integer LayerNorm whose output site is `out_site`, under `--ptf`.
    pub(crate) fn int_layer_norm(&self, out_site: SiteId) -> Option<&IntLayerNorm> {
        self.layer_norms[out_site.index()].as_ref()
    }

    /// The Log-Int-Softmax of the softmax whose output site is `site`, under `--lis`.
    pub(crate) fn log_int_softmax(&self, site: SiteId) -> Option<&LogIntSoftmax> {
        self.softmaxes[site.index()].as_ref()
    }
}
