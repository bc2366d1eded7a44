//! Swin's quantization sites and their wiring against the original graph (spec §8.2, §8.3).

use fqvit_models::{ModelName, Quantizable, SiteId, TensorClass, Wiring, swin};
use tch::Device;
use tch::nn::VarStore;

fn swin_tiny() -> (VarStore, swin::Swin) {
    let vs = VarStore::new(Device::Cpu);
    let model = tch::no_grad(|| swin::Swin::new(&vs.root(), &swin::Config::swin_tiny()));
    (vs, model)
}

#[test]
fn stages_follow_the_window_rules() {
    let cfg = swin::Config::swin_tiny();
    let windows: Vec<(i64, i64, i64)> =
        (0..4).map(|s| (cfg.resolution(s), cfg.window(s).0, cfg.window(s).1)).collect();
    // Stage 4 (7×7) is one unshifted window.
    assert_eq!(windows, [(56, 7, 3), (28, 7, 3), (14, 7, 3), (7, 7, 0)]);
    assert_eq!(
        ModelName::SwinBase.config(),
        fqvit_models::Architecture::Swin(swin::Config::swin_base())
    );
}

#[test]
fn site_counts_match_the_original() {
    let (_vs, model) = swin_tiny();
    let sites = model.sites();
    let count = |keep: &dyn Fn(&str, TensorClass) -> bool| {
        sites.iter().filter(|(_, s)| keep(&s.name, s.class)).count()
    };
    let act = |c: TensorClass| c != TensorClass::Weight && c != TensorClass::Softmax;
    for (s, depth) in [2, 2, 6, 2].into_iter().enumerate() {
        for b in 0..depth {
            let prefix = format!("layers.{s}.blocks.{b}.");
            assert_eq!(count(&|n, c| n.starts_with(&prefix) && act(c)), 12, "{prefix}: 12 QActs");
            assert_eq!(count(&|n, c| n.starts_with(&prefix) && c == TensorClass::Weight), 4);
            assert_eq!(count(&|n, c| n.starts_with(&prefix) && c == TensorClass::Softmax), 1);
        }
        let merge = format!("layers.{s}.downsample.");
        assert_eq!(count(&|n, c| n.starts_with(&merge) && act(c)), if s > 0 { 2 } else { 0 });
    }
    assert_eq!(count(&|n, c| !n.starts_with("layers.") && act(c)), 6, "top-level QActs");
    assert_eq!(count(&|_, c| c == TensorClass::Weight), 1 + 4 * 12 + 3 + 1, "weights");
}

#[test]
fn site_names_map_to_the_original_modules() {
    let (_vs, model) = swin_tiny();
    let table: Vec<(String, String, TensorClass)> = model
        .sites()
        .iter()
        .filter(|(_, s)| {
            !s.name.starts_with("layers.")
                || s.name.starts_with("layers.0.blocks.0.")
                || s.name.starts_with("layers.1.downsample.")
        })
        .map(|(_, s)| (s.name.clone(), s.original.clone(), s.class))
        .collect();
    use TensorClass::*;
    let expected = [
        ("input", "qact_input", Activation),
        ("patch_embed.proj", "patch_embed.proj", Weight),
        ("patch_embed.proj_out", "patch_embed.qact_before_norm", Activation),
        ("patch_embed.out", "patch_embed.qact", Activation),
        ("layers.0.blocks.0.norm1_out", "layers.0.blocks.0.qact1", Activation),
        ("layers.0.blocks.0.attn.qkv", "layers.0.blocks.0.attn.qkv", Weight),
        ("layers.0.blocks.0.attn.qkv_out", "layers.0.blocks.0.attn.qact1", Activation),
        ("layers.0.blocks.0.attn.attn_scores", "layers.0.blocks.0.attn.qact_attn1", Activation),
        (
            "layers.0.blocks.0.attn.relative_position_bias",
            "layers.0.blocks.0.attn.qact_table",
            Activation,
        ),
        ("layers.0.blocks.0.attn.attn_biased", "layers.0.blocks.0.attn.qact2", Activation),
        ("layers.0.blocks.0.attn.attn_probs", "layers.0.blocks.0.attn.log_int_softmax", Softmax),
        ("layers.0.blocks.0.attn.context", "layers.0.blocks.0.attn.qact3", Activation),
        ("layers.0.blocks.0.attn.proj", "layers.0.blocks.0.attn.proj", Weight),
        ("layers.0.blocks.0.attn.proj_out", "layers.0.blocks.0.attn.qact4", Activation),
        ("layers.0.blocks.0.residual1", "layers.0.blocks.0.qact2", LayerNormInput),
        ("layers.0.blocks.0.norm2_out", "layers.0.blocks.0.qact3", Activation),
        ("layers.0.blocks.0.mlp.fc1", "layers.0.blocks.0.mlp.fc1", Weight),
        ("layers.0.blocks.0.mlp.hidden", "layers.0.blocks.0.mlp.qact1", Activation),
        ("layers.0.blocks.0.mlp.fc2", "layers.0.blocks.0.mlp.fc2", Weight),
        ("layers.0.blocks.0.mlp.out", "layers.0.blocks.0.mlp.qact2", Activation),
        ("layers.0.blocks.0.residual2", "layers.0.blocks.0.qact4", LayerNormInput),
        // timm merges at the start of stage 1, the original at the end of stage 0.
        ("layers.1.downsample.norm_out", "layers.0.downsample.qact1", Activation),
        ("layers.1.downsample.reduction", "layers.0.downsample.reduction", Weight),
        ("layers.1.downsample.out", "layers.0.downsample.qact2", LayerNormInput),
        ("norm_out", "qact2", Activation),
        ("pooled", "qact3", Activation),
        ("head.fc", "head", Weight),
        ("logits", "act_out", Activation),
    ];
    let expected: Vec<(String, String, TensorClass)> =
        expected.iter().map(|&(a, b, c)| (a.into(), b.into(), c)).collect();
    assert_eq!(table, expected);
}

/// Spec §8.3, consumer by consumer.
#[test]
fn layer_norms_and_softmaxes_read_the_original_scales() {
    let (_vs, model) = swin_tiny();
    let sites = model.sites();
    let id = |name: &str| sites.find(name).unwrap_or_else(|| panic!("no site {name}"));
    let wire = |consumer: &str, input: &str, output: Option<&str>, expand: i64| Wiring {
        consumer: consumer.into(),
        in_site: id(input),
        out_site: output.map(id),
        in_expand: expand,
    };
    let mut expected =
        vec![wire("patch_embed.norm", "patch_embed.proj_out", Some("patch_embed.out"), 1)];
    let mut last: String = "patch_embed.out".into();
    for (s, depth) in [2usize, 2, 6, 2].into_iter().enumerate() {
        if s > 0 {
            let m = format!("layers.{s}.downsample");
            expected.push(wire(&format!("{m}.norm"), &last, Some(&format!("{m}.norm_out")), 4));
            last = format!("{m}.out");
        }
        for b in 0..depth {
            let o = format!("layers.{s}.blocks.{b}");
            expected.push(wire(&format!("{o}.norm1"), &last, Some(&format!("{o}.norm1_out")), 1));
            expected.push(wire(
                &format!("{o}.attn.softmax"),
                &format!("{o}.attn.attn_biased"),
                None,
                1,
            ));
            expected.push(wire(
                &format!("{o}.norm2"),
                &format!("{o}.residual1"),
                Some(&format!("{o}.norm2_out")),
                1,
            ));
            last = format!("{o}.residual2");
        }
    }
    expected.push(wire("norm", &last, Some("norm_out"), 1));
    assert_eq!(model.wiring(), expected);
    // The first block reads the layer-wise patch_embed.qact, every other LayerNorm a PTF site.
    let class = |site: SiteId| sites.get(site).class;
    assert_eq!(class(model.wiring()[1].in_site), TensorClass::Activation);
    for w in model.wiring().iter().skip(2).filter(|w| w.out_site.is_some()) {
        assert_eq!(class(w.in_site), TensorClass::LayerNormInput, "{}", w.consumer);
    }
}
