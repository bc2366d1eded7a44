//! # fqvit-program: the integer program of a quantized model
//!
//! The quantized model in `fqvit-models` describes its own integer form as a [`Program`]: a list
//! of typed ops in forward order, each reading earlier values and naming the artifact's tensors
//! and sites it needs. `fqvit-calib` stores it in the qparams artifact; `fqvit-engine` executes
//! it with integer arithmetic only. The program holds names, never numbers: every constant comes
//! from the artifact's tensors, so there is one copy of each.
//!
//! Values are activations on a site's grid (u8 codes with that site's scale and zero point),
//! except the image (u8 pixels) and the logits (dequantized at the end).

pub use fqvit_ops::softmax::LisBits;
use serde::{Deserialize, Serialize};

pub mod windows;

/// The qparams artifact's metadata key that holds the program as JSON.
pub const ARTIFACT_KEY: &str = "fqvit-program";

/// The version of the op vocabulary; an engine refuses programs it does not know. Version 2
/// carries Log-Int-Softmax's width in the attention ops (version 1 took it from the artifact's
/// provenance; `fqvit-artifact` upgrades such programs from it).
pub const PROGRAM_VERSION: u32 = 2;

/// A value: the output of the op at this position.
pub type Value = usize;

/// The integer program of one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// [`PROGRAM_VERSION`] of the writer.
    pub version: u32,
    /// The ops in execution order; op `i` defines value `i`.
    pub ops: Vec<Op>,
}

/// How 8-bit pixels become the normalized image: `x_c = (p/255 − mean_c) / std_c`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

/// One typed op. Shapes are row-major; tokens × channels for activations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// The input: `(B, 3, H, W)` u8 pixels after resizing and cropping.
    Image {
        /// Side of the square image.
        size: usize,
        /// The normalization the float model applies to it.
        normalize: Normalize,
    },
    /// Quantizes the normalized image on `site` (DeiT's `qact_input`).
    QuantizeImage {
        /// The image.
        input: Value,
        /// The activation site.
        site: String,
    },
    /// Non-overlapping `patch × patch` convolution (weight site `layer`, bias `<layer>.bias`),
    /// then `(B, patches, D)` codes on `out_site`.
    PatchEmbed {
        /// The image or its codes.
        input: Value,
        /// The weight site (`patch_embed.proj`).
        layer: String,
        /// Patch side (= stride).
        patch: usize,
        /// The site after it.
        out_site: String,
    },
    /// ViT's embedding: the patch codes requantized on `embed_site` after the class token
    /// (`cls`, quantized on `embed_site`), plus `pos` quantized on `pos_site`, on `out_site`.
    Embed {
        /// Patch codes.
        input: Value,
        /// The class token tensor.
        cls: String,
        /// The position embedding tensor.
        pos: String,
        /// Site of the concatenation.
        embed_site: String,
        /// Site of the position embedding.
        pos_site: String,
        /// Site of the sum.
        out_site: String,
    },
    /// Integer LayerNorm (PTF) over the last dimension, parameters `<norm>.weight/.bias`, then
    /// codes on `out_site`.
    LayerNorm {
        /// Codes on a layer-wise or PTF site.
        input: Value,
        /// The LayerNorm's parameter prefix.
        norm: String,
        /// The site after it.
        out_site: String,
    },
    /// `x · Wᵀ + b` (weight site `layer`, bias `<layer>.bias`), optionally GELU, then codes on
    /// `out_site`.
    Linear {
        /// Codes on a layer-wise site.
        input: Value,
        /// The weight site.
        layer: String,
        /// Whether the layer has a bias (Swin's patch-merging reduction has none); programs
        /// written before this field existed had biases everywhere.
        #[serde(default = "yes")]
        bias: bool,
        /// GELU (exact, erf) before the out-site.
        gelu: bool,
        /// The site after it.
        out_site: String,
    },
    /// Multi-head self-attention on `qkv` codes `(B, N, 3D)`: `q·kᵀ · head_dim^-½` on
    /// `scores_site`, Log-Int-Softmax with `lis_bits`, `· v`, heads merged, codes on `out_site`.
    Attention {
        /// qkv codes.
        input: Value,
        /// Heads.
        heads: usize,
        /// Log-Int-Softmax's code width; `None`: the uniform softmax (calibrated without LIS),
        /// which has no integer form here.
        #[serde(default)]
        lis_bits: Option<LisBits>,
        /// Site of the scaled scores.
        scores_site: String,
        /// Site of the context.
        out_site: String,
    },
    /// Swin's window attention on `qkv` codes `(B, H·W, 3C)` in token order (the linear layers
    /// around it act per token, so they commute with the windowing): the grid cyclically
    /// shifted by `shift` and cut into `window × window` windows ([`windows::tokens`]); per
    /// window and head `(q·head_dim^-½)·kᵀ` on `scores_site`, plus the relative position bias
    /// (`table`, quantized on `table_site`, gathered by [`windows::relative_position_index`]) on
    /// `biased_site`, the shift mask ([`windows::regions`]) where `shift > 0`, Log-Int-Softmax
    /// with `biased_site`'s scale and `lis_bits`, `· v`; the context back in token order on
    /// `out_site`.
    WindowAttention {
        /// qkv codes.
        input: Value,
        /// Heads.
        heads: usize,
        /// As [`Op::Attention`]'s.
        #[serde(default)]
        lis_bits: Option<LisBits>,
        /// Side of the square token grid.
        resolution: usize,
        /// Window side.
        window: usize,
        /// Cyclic shift (0: none, no mask).
        shift: usize,
        /// Site of the scaled scores.
        scores_site: String,
        /// The relative position bias table tensor, `((2w − 1)², heads)`.
        table: String,
        /// Site of the quantized table.
        table_site: String,
        /// Site of the scores plus bias.
        biased_site: String,
        /// Site of the context.
        out_site: String,
    },
    /// Swin's patch merging gather: `(B, H·W, C)` to `(B, H/2·W/2, 4C)`, each token the
    /// channels of its 2×2 neighbours `[x(0,0), x(1,0), x(0,1), x(1,1)]` (row, column
    /// offsets); the codes keep their site, its per-channel entries tiled four times.
    PatchMerge {
        /// Codes.
        input: Value,
        /// Side of the square token grid.
        resolution: usize,
    },
    /// The mean over tokens `(B, N, C)` to `(B, 1, C)`, on `out_site`.
    MeanTokens {
        /// Codes.
        input: Value,
        /// The site of the mean.
        out_site: String,
    },
    /// Element-wise sum of two code tensors of one shape, on `out_site` (a residual add).
    Add {
        /// First summand.
        a: Value,
        /// Second summand.
        b: Value,
        /// The site of the sum.
        out_site: String,
    },
    /// Token `index` of `(B, N, C)` codes, `(B, 1, C)`, same site.
    SelectToken {
        /// Codes.
        input: Value,
        /// The token.
        index: usize,
    },
    /// The result: codes dequantized to float logits `(B, classes)`.
    Output {
        /// Codes.
        input: Value,
    },
}

impl Op {
    /// The values this op reads.
    pub fn inputs(&self) -> Vec<Value> {
        match self {
            Op::Image { .. } => vec![],
            Op::QuantizeImage { input, .. }
            | Op::PatchEmbed { input, .. }
            | Op::Embed { input, .. }
            | Op::LayerNorm { input, .. }
            | Op::Linear { input, .. }
            | Op::Attention { input, .. }
            | Op::WindowAttention { input, .. }
            | Op::PatchMerge { input, .. }
            | Op::MeanTokens { input, .. }
            | Op::SelectToken { input, .. }
            | Op::Output { input } => vec![*input],
            Op::Add { a, b, .. } => vec![*a, *b],
        }
    }

    /// The site whose grid its output lies on (`None`: the image, a token selection or gather,
    /// logits).
    pub fn out_site(&self) -> Option<&str> {
        match self {
            Op::QuantizeImage { site, .. } => Some(site),
            Op::PatchEmbed { out_site, .. }
            | Op::Embed { out_site, .. }
            | Op::LayerNorm { out_site, .. }
            | Op::Linear { out_site, .. }
            | Op::Attention { out_site, .. }
            | Op::WindowAttention { out_site, .. }
            | Op::MeanTokens { out_site, .. }
            | Op::Add { out_site, .. } => Some(out_site),
            Op::Image { .. }
            | Op::SelectToken { .. }
            | Op::PatchMerge { .. }
            | Op::Output { .. } => None,
        }
    }
}

fn yes() -> bool {
    true
}

/// Builds a program op by op.
#[derive(Debug, Default)]
pub struct Builder {
    ops: Vec<Op>,
    lis_bits: Option<LisBits>,
}

impl Builder {
    /// A builder for a model whose attention runs Log-Int-Softmax at `lis_bits`.
    pub fn new(lis_bits: Option<LisBits>) -> Self {
        Builder { ops: Vec::new(), lis_bits }
    }

    /// The width its attention ops carry.
    pub fn lis_bits(&self) -> Option<LisBits> {
        self.lis_bits
    }

    /// Appends an op and returns its value.
    pub fn push(&mut self, op: Op) -> Value {
        self.ops.push(op);
        self.ops.len() - 1
    }

    /// The program.
    pub fn finish(self) -> Program {
        Program { version: PROGRAM_VERSION, ops: self.ops }
    }
}

/// The largest image side a program may declare (its buffers are sized from it).
pub const MAX_IMAGE_SIDE: usize = 4096;

impl Program {
    /// Brings a version-1 program, whose attention ops did not carry Log-Int-Softmax's width,
    /// to this version with the width its artifact recorded beside it.
    pub fn upgrade(&mut self, lis_bits: Option<LisBits>) {
        if self.version != 1 {
            return;
        }
        for op in &mut self.ops {
            if let Op::Attention { lis_bits: l, .. } | Op::WindowAttention { lis_bits: l, .. } = op
            {
                *l = lis_bits;
            }
        }
        self.version = PROGRAM_VERSION;
    }

    /// Checks that every op reads only earlier values, the first op is the only image (with a
    /// side up to [`MAX_IMAGE_SIDE`]) and the last is the only output. Returns what is wrong,
    /// naming the op.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != PROGRAM_VERSION {
            return Err(format!(
                "program version {} (this engine runs version {PROGRAM_VERSION})",
                self.version
            ));
        }
        match self.ops.first() {
            Some(Op::Image { size, .. }) if !(1..=MAX_IMAGE_SIDE).contains(size) => {
                return Err(format!(
                    "op 0: an image side of {size}, expected 1..={MAX_IMAGE_SIDE}"
                ));
            }
            Some(Op::Image { .. }) => {}
            _ => return Err("op 0 is not the image".into()),
        }
        if !matches!(self.ops.last(), Some(Op::Output { .. })) {
            return Err("the last op is not the output".into());
        }
        for (i, op) in self.ops.iter().enumerate() {
            if i > 0 && matches!(op, Op::Image { .. }) {
                return Err(format!("op {i} is a second image"));
            }
            if i + 1 < self.ops.len() && matches!(op, Op::Output { .. }) {
                return Err(format!("op {i} is an output before the end"));
            }
            if let Some(v) = op.inputs().into_iter().find(|&v| v >= i) {
                return Err(format!("op {i} reads value {v}, which is not defined before it"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Program {
        let mut b = Builder::default();
        let n = Normalize { mean: [0.5; 3], std: [0.5; 3] };
        let img = b.push(Op::Image { size: 32, normalize: n });
        let x = b.push(Op::PatchEmbed {
            input: img,
            layer: "patch_embed.proj".into(),
            patch: 16,
            out_site: "patch_embed.out".into(),
        });
        b.push(Op::Output { input: x });
        b.finish()
    }

    #[test]
    fn round_trips_as_json_and_validates() {
        let p = tiny();
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""op":"patch-embed""#), "{json}");
        let back: Program = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        back.validate().unwrap();
    }

    #[test]
    fn a_version_1_program_takes_the_recorded_width() {
        let json = r#"{"version": 1, "ops": [
            {"op": "image", "size": 32, "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
            {"op": "attention", "input": 0, "heads": 2, "scores_site": "s", "out_site": "c"},
            {"op": "output", "input": 1}]}"#;
        let mut p: Program = serde_json::from_str(json).unwrap();
        assert!(p.validate().unwrap_err().contains("program version 1"));
        p.upgrade(Some(LisBits::FOUR));
        p.validate().unwrap();
        assert!(matches!(p.ops[1], Op::Attention { lis_bits: Some(LisBits::FOUR), .. }));
        let bad = json.replace(r#""heads": 2,"#, r#""heads": 2, "lis_bits": 9,"#);
        let err = serde_json::from_str::<Program>(&bad).unwrap_err().to_string();
        assert!(err.contains("9 bits: Log-Int-Softmax takes 2..=8"), "{err}");
    }

    #[test]
    fn refuses_forward_references_and_other_versions() {
        let mut p = tiny();
        p.ops[1] = Op::SelectToken { input: 2, index: 0 };
        assert_eq!(p.validate().unwrap_err(), "op 1 reads value 2, which is not defined before it");
        let mut p = tiny();
        p.version = 7;
        assert!(p.validate().unwrap_err().contains("program version 7"));
        let mut p = tiny();
        p.ops.pop();
        assert_eq!(p.validate().unwrap_err(), "the last op is not the output");
    }
}
