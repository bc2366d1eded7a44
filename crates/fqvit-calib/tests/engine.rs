//! The integer engine (`fqvit-engine`) against the simulation, on random tiny DeiT and ViT
//! models calibrated here (8/8/4, PTF, LIS) and written as artifacts, as `quantize` does.

mod common;

use std::path::{Path, PathBuf};

use common::tiny::{
    calibrate_and_write, calibrated, calibrated_heads, engine_follows_simulation, images,
    images_of, integer_twin,
};
use fqvit_calib::Experiment;
use fqvit_engine::{Engine, Error, Images, Isa, KernelKind, Options};
use fqvit_models::{Mode, Quantizable, Quantized, swin};
use tch::Device;
use tch::nn::VarStore;

/// Engine logits are dequantized codes on the logits site, as the simulation's are. Every
/// departure (exact GEMMs, rounded biases, dyadic multipliers, Σ of LIS in integers) moves a
/// value by far less than a step, so codes flip only near rounding boundaries (measured here:
/// 160/160 equal for both); the bounds leave room for the simulation's float32 GEMMs taking
/// other paths on other CPUs, and flipped codes propagating through two blocks.
#[test]
fn engine_logits_follow_the_simulation_for_deit_and_vit() {
    let dir = tempfile::tempdir().unwrap();
    for input_quant in [true, false] {
        let c = calibrated(dir.path(), input_quant, integer_twin());
        let engine = Engine::load(&c.path).unwrap();
        let (pixels, x) = images(&c.cfg, 3, 16);
        let int = engine.run(Images::Pixels(&pixels)).unwrap();
        let from_floats =
            engine.run(Images::Normalized(&Vec::<f32>::try_from(x.view(-1)).unwrap())).unwrap();
        assert_eq!(int, from_floats, "pixels and their normalization give the same logits");
        let (equal, total, max) = engine_follows_simulation(&c);
        eprintln!(
            "input_quant {input_quant}: {equal}/{total} logit codes equal, max |Δ| {max} codes"
        );
    }
}

#[test]
fn integer_results_do_not_depend_on_threads() {
    let dir = tempfile::tempdir().unwrap();
    let c = calibrated(dir.path(), true, integer_twin());
    let engine = Engine::load(&c.path).unwrap();
    let (pixels, _) = images(&c.cfg, 5, 9);
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| engine.run(Images::Pixels(&pixels)).unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
    // A batch is its images: image 4 alone gives its row of the batch.
    let per = pixels.len() / 9;
    let alone = engine.run(Images::Pixels(&pixels[4 * per..5 * per])).unwrap();
    assert_eq!(alone, one[40..50]);
}

/// An image alone on two threads splits each head's query rows into tasks (65 tokens, one
/// head: two chunks); four images on one thread do not. Both give the same logits.
#[test]
fn attention_split_into_query_rows_gives_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::tiny::calibrated_model(
        dir.path(),
        common::tiny::sized(false, 1, 128),
        integer_twin(),
    );
    let engine = Engine::load(&c.path).unwrap();
    let (pixels, _) = images(&c.cfg, 3, 4);
    let pool = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let batch = pool(1).install(|| engine.run(Images::Pixels(&pixels)).unwrap());
    let per = pixels.len() / 4;
    for i in 0..4 {
        let image = &pixels[i * per..(i + 1) * per];
        let alone = pool(2).install(|| engine.run(Images::Pixels(image)).unwrap());
        assert_eq!(alone, batch[i * 10..(i + 1) * 10], "image {i}");
    }
}

/// Every GEMM kernel this CPU runs, at every instruction set it has, gives the same logits, and
/// one it cannot run is refused.
#[test]
fn integer_results_do_not_depend_on_the_kernel_or_instruction_set() {
    let dir = tempfile::tempdir().unwrap();
    // fc2 reads GELU's PTF codes too: byte planes, or whole 16-bit values with the AVX2 pairs.
    let ptf_hidden = Experiment {
        ptf_sites: [fqvit_models::SiteGroup::MlpHidden].into_iter().collect(),
        ptf_max_factor: fqvit_ops::PtfFactor::MAX,
        ..integer_twin()
    };
    // A 12-bit residual stream: u16 codes through the adds and LayerNorms.
    let wide = Experiment { residual_bits: Some(12), ..integer_twin() };
    for (heads, exp) in [(2, integer_twin()), (4, ptf_hidden), (2, wide)] {
        let c = calibrated_heads(dir.path(), false, heads, exp);
        every_kernel_gives_the_same_logits(&c);
    }
}

fn every_kernel_gives_the_same_logits(c: &common::tiny::Calibrated) {
    let (pixels, _) = images(&c.cfg, 6, 5);
    let reference = Engine::load(&c.path).unwrap().run(Images::Pixels(&pixels)).unwrap();
    let mut ran = Vec::new();
    for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
        for gemm in KernelKind::ALL.map(Some).into_iter().chain([None]) {
            match Engine::load_with(&c.path, Options { gemm, isa }) {
                Ok(engine) => {
                    let logits = engine.run(Images::Pixels(&pixels)).unwrap();
                    assert_eq!(logits, reference, "{}", engine.gemm_kernel());
                    ran.push((gemm, isa));
                }
                Err(err) => {
                    let err = err.to_string();
                    let kind = gemm.expect("detection always finds a kernel");
                    assert!(err.contains(kind.name()) && err.contains("does not run"), "{err}");
                    assert!(err.contains(&format!("with the {isa} instruction set")), "{err}");
                }
            }
        }
    }
    eprintln!("kernels run: {ran:?}");
    assert!(ran.contains(&(Some(KernelKind::Loops), Isa::Scalar)), "{ran:?}");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(ran.contains(&(Some(KernelKind::Avx2Pairs), Isa::Avx2)), "{ran:?}");
        assert!(!ran.contains(&(Some(KernelKind::Avx512Vnni), Isa::Avx2)), "{ran:?}");
    }
}

#[test]
fn bad_artifacts_and_inputs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let no_lis = Experiment { lis: false, ..integer_twin() };
    let c = calibrated(dir.path(), true, no_lis);
    let err = Engine::load(&c.path).unwrap_err().to_string();
    assert!(err.contains("without --lis"), "{err}");

    let c = calibrated(dir.path(), true, integer_twin());
    let bytes = std::fs::read(&c.path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = Engine::load(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.safetensors") && err.contains("truncated"), "{err}");

    let engine = Engine::load(&c.path).unwrap();
    let err = engine.run(Images::Pixels(&[0u8; 100])).unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err}");
    let err = engine.run(Images::Normalized(&vec![0.123f32; 3 * 32 * 32])).unwrap_err().to_string();
    assert!(err.contains("not a normalized 8-bit pixel"), "{err}");
}

/// Each engine op fed the simulation's codes computes what the simulation's op computes from
/// them, up to rounding: the integer and float32 forms of one value differ by far less than a
/// step, so a code may move by one where the value lies next to a rounding boundary. The one
/// exception is attention, where a score code one step off moves a Log-Int-Softmax weight by a
/// factor of two. Free-running, the differences add up along the network (printed). The same
/// holds with the options beyond the original (`configs/fqvit_plus_8_8_4.toml`: PTF on GELU's
/// and fc2's outputs, factors up to 7, the symmetric PTF range, the percentile observer), and
/// at 6/6/4 and 4/8/4, where every op computes at its sites' widths, with a 12-bit
/// residual stream, and with Log-Int-Softmax's exponential on a finer grid (`lis-exp-shift`).
#[test]
fn each_engine_op_follows_the_simulation_on_the_simulations_codes() {
    use fqvit_calib::agreement::{render, site_agreement};
    let dir = tempfile::tempdir().unwrap();
    let plus = Experiment {
        quant_method: fqvit_calib::experiment::Method::Percentile,
        ptf_sites: [fqvit_models::SiteGroup::MlpHidden, fqvit_models::SiteGroup::MlpOut]
            .into_iter()
            .collect(),
        ptf_max_factor: fqvit_ops::PtfFactor::MAX,
        ptf_range: fqvit_calib::experiment::PtfRange::Symmetric,
        ..integer_twin()
    };
    // Below 8 bits the engine computes at the artifact's widths (6-bit activations and
    // weights, 4-bit weights).
    let w6a6 = Experiment { activation_bits: 6, weight_bits: 6, ..integer_twin() };
    let w4a8 = Experiment { weight_bits: 4, ..integer_twin() };
    // A residual stream wider than a byte (u16 codes in the engine's adds and LayerNorms).
    let plus_r12 = Experiment { residual_bits: Some(12), ..plus };
    // Log-Int-Softmax's exponential on a finer grid (`lis-exp-shift`), as fqvit+ below 8 bits.
    let shift = |k: u32| fqvit_ops::softmax::ExpShift::try_from(k).unwrap();
    let w6a6_r12 = Experiment { residual_bits: Some(12), lis_exp_shift: shift(3), ..w6a6 };
    let plus_shifted = Experiment { lis_exp_shift: shift(5), ..plus };
    for (input_quant, heads, exp) in [
        (true, 2, integer_twin()),
        (false, 4, integer_twin()),
        (false, 4, plus),
        (true, 2, w6a6),
        (false, 4, w4a8),
        (false, 4, plus_r12),
        (true, 2, w6a6_r12),
        (false, 4, plus_shifted),
    ] {
        let c = calibrated_heads(dir.path(), input_quant, heads, exp);
        if exp.ptf_max_factor > fqvit_ops::PtfFactor::ORIGINAL_MAX {
            let widest = c
                .model
                .sites()
                .iter()
                .filter_map(|(id, _)| c.quantized.table().get(id)?.ptf.as_ref()?.iter().max())
                .max();
            assert!(widest > Some(&fqvit_ops::PtfFactor::ORIGINAL_MAX), "widest {widest:?}");
            // GELU's PTF output takes several tables, and fc2 reads shifted codes.
            for (id, site) in c.model.sites().iter().filter(|(_, s)| s.name.ends_with("mlp.hidden"))
            {
                let mut f = c.quantized.table().get(id).unwrap().ptf.clone().unwrap();
                f.sort();
                f.dedup();
                assert!(f.len() >= 2, "{}: factors {f:?}", site.name);
            }
        }
        let engine = Engine::load(&c.path).unwrap();
        let (_, x) = images(&c.cfg, 11, 16);
        let both = site_agreement(&c.model, &c.quantized, &engine, &x).unwrap();
        let (free, forced) = (both.free_running, both.forced);
        // Every site the program writes is compared: the image (DeiT), patches, embedding,
        // 2 × (LayerNorm, qkv, context, proj, residual, LayerNorm, GELU, fc2, residual), the
        // final LayerNorm and the logits.
        assert_eq!(forced.len(), usize::from(input_quant) + 2 + 2 * 9 + 2);
        assert_eq!(free.len(), forced.len());
        eprintln!("{}, {heads} heads:\n{}", exp.label(), render(&free, &forced));
        // About 10^-5 of the codes flip on ViT-Tiny (the float32 GEMMs' roundoff); 10^-3 leaves
        // room for other CPUs' summation orders.
        for a in &forced {
            assert!(a.fraction() >= 0.999, "{a:?}");
            if !a.site.ends_with("attn.context") {
                assert!(a.max_delta <= 1, "{a:?}");
            }
        }
    }
}

/// A small Swin (the timm fixture's variant's geometry, twice as wide: 4 stages, windows of 4
/// shifted by 2 in stages 0 and 1, one window in stages 2 and 3) with random weights,
/// calibrated and written as an artifact.
fn calibrated_swin(dir: &Path, exp: Experiment) -> (swin::Swin, Quantized, PathBuf, swin::Config) {
    let cfg =
        swin::Config { embed_dim: 16, num_heads: [1, 2, 2, 4], ..swin::Config::test_variant() };
    let (vs, model) = fqvit_testkit::seeded(11, || {
        let vs = VarStore::new(Device::Cpu);
        let model = swin::Swin::new(&vs.root(), &cfg);
        (vs, model)
    });
    // As for ViT: sharper attention than the initialisation's, and a bias table that matters.
    for (name, mut var) in vs.variables() {
        let gain = if name.ends_with("qkv.weight") {
            8.0
        } else if name.ends_with("relative_position_bias_table") {
            50.0
        } else {
            continue;
        };
        tch::no_grad(|| {
            let _ = var.g_mul_scalar_(gain);
        });
    }
    let path = dir.join("tiny-swin.safetensors");
    let quantized = calibrate_and_write(&model, &vs, exp, 64, &path);
    std::mem::forget(vs); // the model's tensors point into it
    (model, quantized, path, cfg)
}

/// Swin's program (shifted windows with the bias and the mask, patch merging with tiled PTF
/// scales, the mean over tokens) against the simulation: each op fed the simulation's codes,
/// as for ViT, and the logits free-running.
#[test]
fn swin_runs_in_integers_and_each_op_follows_the_simulation() {
    let dir = tempfile::tempdir().unwrap();
    swin_follows_the_simulation(dir.path(), integer_twin());
    // A 12-bit residual stream: u16 codes from the adds and the patch-merging reductions,
    // through the patch merging's gather and the LayerNorms.
    swin_follows_the_simulation(
        dir.path(),
        Experiment { residual_bits: Some(12), ..integer_twin() },
    );
}

fn swin_follows_the_simulation(dir: &Path, exp: Experiment) {
    use fqvit_calib::agreement::{render, site_agreement};
    let (model, quantized, path, cfg) = calibrated_swin(dir, exp);
    let engine = Engine::load(&path).unwrap();
    let (pixels, x) = images_of(64, cfg.preprocess, 13, 8);
    let both = site_agreement(&model, &quantized, &engine, &x).unwrap();
    let (free, forced) = (both.free_running, both.forced);
    // The image, the patches and their LayerNorm; per merge its LayerNorm and reduction; per
    // block 9 sites as ViT's; the final LayerNorm, the mean and the logits.
    assert_eq!(forced.len(), 3 + 3 * 2 + 8 * 9 + 3);
    eprintln!("swin {}:\n{}", exp.label(), render(&free, &forced));
    for a in &forced {
        assert!(a.fraction() >= 0.999, "{a:?}");
        if !a.site.ends_with("attn.context") {
            assert!(a.max_delta <= 1, "{a:?}");
        }
    }
    // Free-running, the first stage (an unshifted and a shifted block) agrees but for codes
    // next to a rounding boundary of the simulation's float32 GEMMs, whose summation order
    // depends on the CPU (measured on an AVX-512 Intel Xeon: ≥ 99.985 % of its codes, ≤ 1
    // apart). How far a flipped code moves further on is not bounded (a score code one step
    // off halves a Log-Int-Softmax weight), so only the share is asserted; flipped codes then
    // multiply through the later stages (measured: 64 % of the logit codes equal).
    for a in free.iter().filter(|a| a.site.starts_with("layers.0.")) {
        assert!(a.fraction() >= 0.999, "{a:?}");
    }
    let sim = tch::no_grad(|| model.forward(&x, &mut Mode::quantized(&quantized)));
    let sim = Vec::<f32>::try_from(sim.contiguous().view(-1)).unwrap();
    let pool = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let int = pool(1).install(|| engine.run(Images::Pixels(&pixels)).unwrap());
    assert_eq!(int, pool(3).install(|| engine.run(Images::Pixels(&pixels)).unwrap()));
    let step = quantized.table().get(model.sites().iter().last().unwrap().0).unwrap().scale[0];
    let equal = sim.iter().zip(&int).filter(|(a, b)| ((*a - *b) / step).abs() < 0.5).count();
    eprintln!("swin: {equal}/{} logit codes equal free-running", int.len());
}

/// A Log-Int-Softmax grid `S·2^-K` below the integer bound 2^-10 is refused when the quantized
/// model is built, naming the scores' site and the setting (the engine would refuse the
/// artifact too); K = 8 takes every scale below 1/4 there.
#[test]
fn an_exponential_grid_below_the_integer_bound_is_refused_by_site() {
    let (_vs, model) = common::tiny::perturbed_deit();
    let exp = Experiment {
        lis_exp_shift: fqvit_ops::softmax::ExpShift::try_from(8).unwrap(),
        ..integer_twin()
    };
    let batch = fqvit_testkit::seeded(5, || {
        tch::Tensor::randn([4, 3, 32, 32], (tch::Kind::Float, Device::Cpu))
    });
    let mut sink = fqvit_calib::Calibrator::new(model.sites(), &exp).unwrap();
    sink.batch(&model, &batch, true, exp.quant_options()).unwrap();
    let table = sink.freeze().unwrap();
    let err = Quantized::new(&model, table, exp.quant_options()).unwrap_err().to_string();
    assert!(err.contains("attn.attn_scores") && err.contains("lis-exp-shift 8"), "{err}");
    assert!(err.contains("below Log-Int-Softmax's integer bound"), "{err}");
}
