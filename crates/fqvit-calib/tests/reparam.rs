//! `reparam-norm-out` (fqvit+): the float network is unchanged by the fold, the block
//! LayerNorms' outputs come out balanced across channels, the settings that would undo it are
//! refused, and the integer engine runs the reparameterized model as the simulation does.

mod common;

use common::tiny::{calibrated, engine_follows_simulation, integer_twin};
use fqvit_calib::experiment::{ActGranularity, Experiment};
use fqvit_calib::reparam::NormOutRanges;
use fqvit_models::{Mode, SiteGroup, vit};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn tiny() -> (VarStore, vit::Vit) {
    fqvit_testkit::seeded(5, || {
        let vs = VarStore::new(Device::Cpu);
        let cfg =
            vit::Config { depth: 2, img_size: 32, num_classes: 10, ..vit::Config::vit_tiny() };
        let model = vit::Vit::new(&vs.root(), &cfg);
        // Channels of very different ranges after the LayerNorms: γ and β spread per channel,
        // as in trained models (timm's initial γ = 1, β = 0 would leave nothing to balance).
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.contains("norm") && name.ends_with("weight") {
                    let spread = (Tensor::randn_like(&v) * 2.0).exp();
                    let _ = v.f_mul_(&spread).unwrap();
                } else {
                    let _ = v.f_add_(&(Tensor::randn_like(&v) * 0.3)).unwrap();
                }
            }
        });
        (vs, model)
    })
}

fn batches() -> Vec<Tensor> {
    fqvit_testkit::seeded(9, || {
        (0..2).map(|_| Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu))).collect()
    })
}

/// The per-channel ranges of every block LayerNorm's output over `x`, `(max − min)` per channel.
fn spans(model: &vit::Vit, x: &Tensor) -> Vec<Tensor> {
    let mut ranges = NormOutRanges::new(model);
    ranges.batch(model, x, Experiment::default().quant_options());
    ranges.spans()
}

/// The fold's algebra, checked in float64 on the first block's norm1 and qkv (the parameters
/// converted before the fold, so that no float32 rounding enters): `qkv(norm1(x))` is the same
/// to float64 rounding. Then, back in float32, every image's top class is unchanged and each
/// block LayerNorm's channels are more alike in range.
#[test]
fn the_fold_keeps_the_float_network_and_balances_the_channels() {
    let (mut vs, model) = tiny();
    let x = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let top = |t: &Tensor| Vec::<i64>::try_from(t.argmax(-1, false)).unwrap();
    let before = tch::no_grad(|| model.forward(&x, &mut Mode::Float));
    let spread = |s: &[Tensor]| -> Vec<f64> {
        s.iter().map(|t| (t.max() / t.min().clamp_min(1e-12)).double_value(&[])).collect()
    };
    let spread_before = spread(&spans(&model, &x));
    let mut ranges = NormOutRanges::new(&model);
    for b in batches() {
        ranges.batch(&model, &b, Experiment::default().quant_options());
    }
    vs.double();
    let var = |name: &str| vs.variables()[name].copy();
    let names = [
        "blocks.0.norm1.weight",
        "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
    ];
    let layer = |p: &[Tensor], xs: &Tensor| {
        let c = xs.size()[1];
        xs.layer_norm([c], Some(&p[0]), Some(&p[1]), 1e-6, false).linear(&p[2], Some(&p[3]))
    };
    let old: Vec<Tensor> = names.iter().map(|n| var(n)).collect();
    // norm1 and norm2 of each of the two blocks (the final norm is left alone).
    assert_eq!(ranges.fold(&model, 8).unwrap(), 4);
    let new: Vec<Tensor> = names.iter().map(|n| var(n)).collect();
    assert!(!old[0].equal(&new[0]), "γ changed");
    let xs =
        fqvit_testkit::seeded(3, || Tensor::randn([16, 192], (Kind::Double, Device::Cpu)) * 3.0);
    let (y0, y1) = (layer(&old, &xs), layer(&new, &xs));
    let scale = y0.abs().max().double_value(&[]);
    let diff = (&y1 - &y0).abs().max().double_value(&[]);
    // Float64 rounding of a LayerNorm and a 192-term sum: about 10^-14 of the scale.
    assert!(diff <= 1e-11 * scale, "qkv(norm1(x)) moved by {diff} (scale {scale})");
    vs.float();
    let after = tch::no_grad(|| model.forward(&x, &mut Mode::Float));
    assert_eq!(top(&before), top(&after));
    let spread_after = spread(&spans(&model, &x));
    for (b, a) in spread_before.iter().zip(&spread_after) {
        assert!(a < b, "channel spread {b} → {a}");
    }
}

#[test]
fn settings_that_undo_it_are_refused() {
    let base = Experiment {
        quant: true,
        ptf: true,
        lis: true,
        reparam_norm_out: true,
        ..Experiment::default()
    };
    assert!(base.validate().is_ok());
    let ptf = Experiment { ptf_sites: [SiteGroup::NormOut].into_iter().collect(), ..base };
    let msg = ptf.validate().unwrap_err().to_string();
    assert!(msg.contains("reparam-norm-out") && msg.contains("ptf-sites = norm-out"), "{msg}");
    let float = Experiment { float_sites: [SiteGroup::NormOut].into_iter().collect(), ..base };
    let msg = float.validate().unwrap_err().to_string();
    assert!(msg.contains("float-sites = norm-out"), "{msg}");
    let channels = Experiment {
        activation_granularity: ActGranularity::ChannelWise,
        quant_method: fqvit_calib::experiment::Method::Minmax,
        ..base
    };
    let msg = channels.validate().unwrap_err().to_string();
    assert!(msg.contains("channel-wise"), "{msg}");
}

#[test]
fn a_non_finite_range_is_refused_naming_the_site_and_nothing_changes() {
    let (vs, model) = tiny();
    let mut ranges = NormOutRanges::new(&model);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let _ = x.get(0).get(0).get(0).get(0).fill_(f64::NAN);
    ranges.batch(&model, &x, Experiment::default().quant_options());
    let snapshot: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let msg = ranges.fold(&model, 8).unwrap_err().to_string();
    assert!(
        msg.contains("reparam-norm-out at site blocks.0.norm1_out") && msg.contains("not finite"),
        "{msg}"
    );
    for (name, t) in snapshot {
        assert!(vs.variables()[&name].equal(&t), "{name} changed");
    }
}

/// The engine runs a reparameterized artifact as its twin simulation does, by the bounds of
/// `engine_logits_follow_the_simulation_for_deit_and_vit` (tests/engine.rs): the fold leaves
/// ordinary γ, β, W and b, so nothing in the integer forms changes.
#[test]
fn the_engine_runs_a_reparameterized_model_as_the_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let exp = Experiment { reparam_norm_out: true, ..integer_twin() };
    let c = calibrated(dir.path(), false, exp);
    engine_follows_simulation(&c);
}
