//! The checkpoints the paper used, converted to timm's layout (spec §10):
//!
//! - DeiT `.pth` (`{"model": state dict}`): timm's keys already;
//! - Swin `.pth` (Microsoft's release): patch merging moves from the end of stage `s` to the
//!   start of stage `s + 1`, `head.*` becomes `head.fc.*`, and the derived buffers
//!   (`relative_position_index`, `attn_mask`) are dropped (we compute them);
//! - ViT AugReg `.npz` (Google's JAX checkpoints): renamed and transposed as timm's
//!   `_load_weights` does.
//!
//! `.pth` files are read without executing pickle code (candle's pickle reader interprets the
//! opcodes and only rebuilds tensors; cargo feature `pth`, off by default, so that the common
//! build does not compile candle); `.npz` with tch's reader. The result still has to pass
//! [`load_strict`](crate::weights::load_strict) against the model.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::Architecture;
use crate::error::{Error, Result};

/// Reads `input` (`.pth` or `.npz`) for a model of `arch` and returns its tensors under timm's
/// names, sorted.
pub fn convert(arch: &Architecture, input: &Path) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| Error::Convert { path: input.to_owned(), reason };
    let ext = input.extension().and_then(|e| e.to_str()).unwrap_or_default();
    let tensors = match (arch, ext) {
        (Architecture::Vit(_), "pth") => read_pth(input, |_| true)?,
        (Architecture::Swin(_), "pth") => swin_to_timm(read_pth(input, |k| {
            !k.ends_with("relative_position_index") && !k.ends_with("attn_mask")
        })?),
        (Architecture::Vit(cfg), "npz") => augreg_to_timm(read_npz(input)?, cfg.num_heads)
            .map_err(|reason| bad(format!("not a ViT AugReg checkpoint: {reason}")))?,
        (Architecture::Swin(_), "npz") => {
            return Err(bad("Swin checkpoints are `.pth` files; `.npz` is for ViT".into()));
        }
        _ => return Err(bad("expected a `.pth` (DeiT, Swin) or `.npz` (ViT AugReg) file".into())),
    };
    Ok(tensors.into_iter().collect())
}

/// The tensors of a PyTorch checkpoint (its `model` entry if it has one) that `keep` accepts.
#[cfg(feature = "pth")]
fn read_pth(path: &Path, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, Tensor>> {
    let bad = |reason: String| Error::Convert { path: path.to_owned(), reason };
    let file = candle_core::pickle::PthTensors::new(path, Some("model"))
        .or_else(|_| candle_core::pickle::PthTensors::new(path, None))
        .map_err(|e| bad(format!("not a readable PyTorch checkpoint: {e}")))?;
    let mut out = BTreeMap::new();
    for name in file.tensor_infos().keys().filter(|k| keep(k)) {
        let t = file
            .get(name)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?
            .ok_or_else(|| bad(format!("tensor {name} is listed but absent")))?;
        out.insert(name.clone(), to_tch(&t).map_err(|e| bad(format!("tensor {name}: {e}")))?);
    }
    if out.is_empty() {
        return Err(bad("holds no tensors".into()));
    }
    Ok(out)
}

#[cfg(feature = "pth")]
/// A float32 candle tensor as a tch tensor (the paper's checkpoints are float32).
fn to_tch(t: &candle_core::Tensor) -> std::result::Result<Tensor, String> {
    if t.dtype() != candle_core::DType::F32 {
        return Err(format!("{:?}, expected float32", t.dtype()));
    }
    let data: Vec<f32> = t.flatten_all().and_then(|f| f.to_vec1()).map_err(|e| e.to_string())?;
    let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(&data).view(shape.as_slice()))
}

/// Without the `pth` feature: the refusal says how to build with it.
#[cfg(not(feature = "pth"))]
fn read_pth(path: &Path, _keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, Tensor>> {
    Err(Error::Convert { path: path.to_owned(), reason: PTH_FEATURE.into() })
}

/// What a build without the `pth` feature says about a `.pth` checkpoint.
pub const PTH_FEATURE: &str = "reading `.pth` checkpoints needs fqvit built with the `pth` \
     feature (cargo build --release -p fqvit-cli --features pth)";

fn read_npz(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let tensors = Tensor::read_npz(path).map_err(|e| Error::Convert {
        path: path.to_owned(),
        reason: format!("not a readable .npz file: {e}"),
    })?;
    Ok(tensors.into_iter().map(|(k, v)| (k, v.to_kind(Kind::Float))).collect())
}

/// Microsoft's Swin layout to timm's (the inverse of what timm's `checkpoint_filter_fn` undoes).
fn swin_to_timm(tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(k, v)| {
            let merge = k
                .strip_prefix("layers.")
                .and_then(|r| r.split_once(".downsample."))
                .and_then(|(stage, rest)| Some((stage.parse::<usize>().ok()?, rest)));
            let k = match merge {
                Some((stage, rest)) => format!("layers.{}.downsample.{rest}", stage + 1),
                None => k,
            };
            let k = match k.strip_prefix("head.") {
                Some(rest) if !rest.starts_with("fc.") => format!("head.fc.{rest}"),
                _ => k,
            };
            (k, v)
        })
        .collect()
}

/// Google's AugReg names to timm's (spec §10), taking each array out of `w`.
fn augreg_to_timm(
    mut w: BTreeMap<String, Tensor>,
    num_heads: i64,
) -> std::result::Result<BTreeMap<String, Tensor>, String> {
    let prefix = if w.contains_key("opt/target/embedding/kernel") { "opt/target/" } else { "" };
    let mut take = |name: &str| {
        w.remove(&format!("{prefix}{name}")).ok_or_else(|| format!("no `{prefix}{name}`"))
    };
    let mut out = BTreeMap::new();
    // HWIO → OIHW.
    out.insert("patch_embed.proj.weight".into(), take("embedding/kernel")?.permute([3, 2, 0, 1]));
    out.insert("patch_embed.proj.bias".into(), take("embedding/bias")?);
    out.insert("cls_token".into(), take("cls")?);
    out.insert("pos_embed".into(), take("Transformer/posembed_input/pos_embedding")?);
    out.insert("norm.weight".into(), take("Transformer/encoder_norm/scale")?);
    out.insert("norm.bias".into(), take("Transformer/encoder_norm/bias")?);
    out.insert("head.weight".into(), take("head/kernel")?.tr());
    out.insert("head.bias".into(), take("head/bias")?);
    let d = out["norm.weight"].size()[0];
    for i in 0.. {
        let p = format!("Transformer/encoderblock_{i}/");
        if !w.contains_key(&format!("{prefix}{p}LayerNorm_0/scale")) {
            break;
        }
        let b = format!("blocks.{i}.");
        let mut take = |name: &str| {
            w.remove(&format!("{prefix}{p}{name}")).ok_or_else(|| format!("no `{prefix}{p}{name}`"))
        };
        out.insert(format!("{b}norm1.weight"), take("LayerNorm_0/scale")?);
        out.insert(format!("{b}norm1.bias"), take("LayerNorm_0/bias")?);
        out.insert(format!("{b}norm2.weight"), take("LayerNorm_2/scale")?);
        out.insert(format!("{b}norm2.bias"), take("LayerNorm_2/bias")?);
        let mha = "MultiHeadDotProductAttention_1/";
        let (mut ws, mut bs) = (Vec::new(), Vec::new());
        for n in ["query", "key", "value"] {
            // [D, H, hd] → (H·hd, D).
            ws.push(take(&format!("{mha}{n}/kernel"))?.reshape([d, -1]).tr());
            bs.push(take(&format!("{mha}{n}/bias"))?.reshape([-1]));
        }
        out.insert(format!("{b}attn.qkv.weight"), Tensor::cat(&ws, 0));
        out.insert(format!("{b}attn.qkv.bias"), Tensor::cat(&bs, 0));
        // [H, hd, D] → [D, H, hd] → (D, H·hd).
        let proj = take(&format!("{mha}out/kernel"))?;
        if proj.size().first() != Some(&num_heads) {
            return Err(format!(
                "{p}{mha}out/kernel has shape {:?}, expected {num_heads} heads first",
                proj.size()
            ));
        }
        out.insert(format!("{b}attn.proj.weight"), proj.permute([2, 0, 1]).reshape([d, -1]));
        out.insert(format!("{b}attn.proj.bias"), take(&format!("{mha}out/bias"))?);
        for r in 0..2 {
            out.insert(
                format!("{b}mlp.fc{}.weight", r + 1),
                take(&format!("MlpBlock_3/Dense_{r}/kernel"))?.tr(),
            );
            out.insert(
                format!("{b}mlp.fc{}.bias", r + 1),
                take(&format!("MlpBlock_3/Dense_{r}/bias"))?,
            );
        }
    }
    // Whatever is left (optimizer state, pre-logits) is not part of the model.
    let ignored: Vec<&String> = w.keys().filter(|k| k.starts_with(prefix)).collect();
    if !ignored.is_empty() {
        tracing::warn!(count = ignored.len(), first = %ignored[0], "arrays not used by the model");
    }
    Ok(out.into_iter().map(|(k, v)| (k, v.contiguous())).collect())
}
