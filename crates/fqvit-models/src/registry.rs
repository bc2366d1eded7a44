//! Model names: architecture presets, timm hub names, preprocessing. One table.

use std::fmt;
use std::str::FromStr;

use tch::nn::Path;

use crate::error::Error;
use crate::quant::Classifier;
use crate::{swin, vit};

/// A model family with its hyper-parameters: what a model is, apart from its weights.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "family", rename_all = "kebab-case")]
pub enum Architecture {
    /// ViT or DeiT.
    Vit(vit::Config),
    /// Swin.
    Swin(swin::Config),
}

impl Architecture {
    /// Builds the model with randomly initialised variables under `p` (timm key names).
    pub fn build(&self, p: &Path<'_>) -> Box<dyn Classifier> {
        match self {
            Architecture::Vit(cfg) => Box::new(vit::Vit::new(p, cfg)),
            Architecture::Swin(cfg) => Box::new(swin::Swin::new(p, cfg)),
        }
    }

    /// The input preprocessing.
    pub fn preprocess(&self) -> Preprocess {
        match self {
            Architecture::Vit(cfg) => cfg.preprocess,
            Architecture::Swin(cfg) => cfg.preprocess,
        }
    }
}

/// A checkpoint file on the Hugging Face hub at a fixed commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HubCheckpoint {
    /// `owner/name`.
    pub repo: &'static str,
    /// The commit (40 hex digits) the file is taken from.
    pub revision: &'static str,
    /// The file's sha256 at that commit (its LFS object id).
    pub sha256: &'static str,
    /// The file's name in the repository.
    pub file: &'static str,
}

/// A model the CLI and the library know by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelName {
    /// ViT-Tiny/16 (DeiT-Tiny's shape, ViT preprocessing, no input quantization).
    VitTiny,
    /// DeiT-Tiny/16.
    DeitTiny,
    /// DeiT-Small/16.
    DeitSmall,
    /// DeiT-Base/16.
    DeitBase,
    /// ViT-Base/16.
    VitBase,
    /// ViT-Large/16.
    VitLarge,
    /// Swin-T (patch 4, window 7).
    SwinTiny,
    /// Swin-S.
    SwinSmall,
    /// Swin-B.
    SwinBase,
}

/// Input preprocessing of a model family (spec §9): resize the short side to
/// `⌊224 / crop_pct⌋` (bicubic, antialiased), centre crop 224, normalize.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    /// Crop fraction: 0.875 (DeiT) or 0.9 (ViT, Swin).
    pub crop_pct: f64,
    /// Per-channel mean (RGB).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    pub std: [f32; 3],
    /// Output side.
    pub size: u32,
}

impl Preprocess {
    /// DeiT: ImageNet mean/std, crop 0.875.
    pub const DEIT: Preprocess =
        Preprocess { crop_pct: 0.875, mean: IMAGENET_MEAN, std: IMAGENET_STD, size: 224 };
    /// ViT (AugReg): mean = std = 0.5, crop 0.9.
    pub const VIT: Preprocess =
        Preprocess { crop_pct: 0.9, mean: [0.5; 3], std: [0.5; 3], size: 224 };
    /// Swin: ImageNet mean/std, crop 0.9.
    pub const SWIN: Preprocess =
        Preprocess { crop_pct: 0.9, mean: IMAGENET_MEAN, std: IMAGENET_STD, size: 224 };

    /// The short side before cropping: `⌊size / crop_pct⌋`.
    pub fn resize(&self) -> u32 {
        (f64::from(self.size) / self.crop_pct).floor() as u32
    }
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl ModelName {
    /// Every model, in the published table's order.
    pub const ALL: [ModelName; 9] = [
        ModelName::VitTiny,
        ModelName::DeitTiny,
        ModelName::DeitSmall,
        ModelName::DeitBase,
        ModelName::VitBase,
        ModelName::VitLarge,
        ModelName::SwinTiny,
        ModelName::SwinSmall,
        ModelName::SwinBase,
    ];

    /// The name on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelName::VitTiny => "vit_tiny",
            ModelName::DeitTiny => "deit_tiny",
            ModelName::DeitSmall => "deit_small",
            ModelName::DeitBase => "deit_base",
            ModelName::VitBase => "vit_base",
            ModelName::VitLarge => "vit_large",
            ModelName::SwinTiny => "swin_tiny",
            ModelName::SwinSmall => "swin_small",
            ModelName::SwinBase => "swin_base",
        }
    }

    /// The timm checkpoint on the Hugging Face hub, pinned: repository, commit, and the sha256
    /// of its `model.safetensors` (provenance of the pins: `docs/weights.md`).
    pub const fn hub(self) -> HubCheckpoint {
        let (repo, revision, sha256) = match self {
            ModelName::VitTiny => (
                "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                "7d3afdd0cf93ad84d986eb2d6bcc5812ebd0b106",
                "fecf81b492bd13ee7a5297cb74d1d417aac8bf7e1b7d96aed89c4691984587ed",
            ),
            ModelName::DeitTiny => (
                "timm/deit_tiny_patch16_224.fb_in1k",
                "80e968688553f219e4a86f940ed945a23709c16f",
                "21d4764d94f6c3ffdb6da3581115a0a1ee2d505537d96883b540e54766407c9e",
            ),
            ModelName::DeitSmall => (
                "timm/deit_small_patch16_224.fb_in1k",
                "91327a9c99f98fe6b524cd4d397b7226b80e1365",
                "1e747b4a8d0df2cfbd3c450e8c97685d867448ab0c2ddbfb34b6885f5cb23e5b",
            ),
            ModelName::DeitBase => (
                "timm/deit_base_patch16_224.fb_in1k",
                "b78cc5532a69df6bcad9c3a8d76653fd20b31ac6",
                "cd2da27b74ed7f68b599f16c77af3e1e80f01c75f9ad96029d22ce747a247e8e",
            ),
            ModelName::VitBase => (
                "timm/vit_base_patch16_224.augreg_in21k_ft_in1k",
                "b5b38b8f7dd93ce67d12e356a8771556b95c8cf9",
                "c401d219603ac3e20b6373c7b198c78d3a733f80b755d148bda3bc320ae69800",
            ),
            ModelName::VitLarge => (
                "timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
                "0930ab3308b84cb2ae091a4a80703c459412a4c7",
                "109390825a5bada2864f1b74445a63d29c51ef079c349644bc98996c452f6cf1",
            ),
            ModelName::SwinTiny => (
                "timm/swin_tiny_patch4_window7_224.ms_in1k",
                "4cc3a7275b50b53a7bec45f32c236ebe64227cff",
                "fb01861f793143135fa0d6cd97b1631e4b33eaa3ee162bbea9e62de1c76ebac1",
            ),
            ModelName::SwinSmall => (
                "timm/swin_small_patch4_window7_224.ms_in1k",
                "b59828b00f6fac85d99c8eac48094b605b6e7ec3",
                "8fa31b116680e02e4ad6ad06eb29a1b9ca56bd93a2e88510a0bc7e82e0e2024f",
            ),
            ModelName::SwinBase => (
                "timm/swin_base_patch4_window7_224.ms_in1k",
                "160443c7878650977f11a3a89d4ed685b001a304",
                "6544e46498082f24e90b3e5269d909dad03aa016db8711777313c162e136420c",
            ),
        };
        HubCheckpoint { repo, revision, sha256, file: "model.safetensors" }
    }

    /// The timm repository on the Hugging Face hub.
    pub const fn hub_repo(self) -> &'static str {
        self.hub().repo
    }

    /// The folder under a weights directory: the hub name without `timm/`.
    pub fn weights_folder(self) -> &'static str {
        self.hub_repo().trim_start_matches("timm/")
    }

    /// The architecture.
    pub fn config(self) -> Architecture {
        match self {
            ModelName::VitTiny => Architecture::Vit(vit::Config::vit_tiny()),
            ModelName::DeitTiny => Architecture::Vit(vit::Config::deit_tiny()),
            ModelName::DeitSmall => Architecture::Vit(vit::Config::deit_small()),
            ModelName::DeitBase => Architecture::Vit(vit::Config::deit_base()),
            ModelName::VitBase => Architecture::Vit(vit::Config::vit_base()),
            ModelName::VitLarge => Architecture::Vit(vit::Config::vit_large()),
            ModelName::SwinTiny => Architecture::Swin(swin::Config::swin_tiny()),
            ModelName::SwinSmall => Architecture::Swin(swin::Config::swin_small()),
            ModelName::SwinBase => Architecture::Swin(swin::Config::swin_base()),
        }
    }

    /// The input preprocessing.
    pub fn preprocess(self) -> Preprocess {
        self.config().preprocess()
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        ModelName::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| Error::UnknownModel(s.to_owned()))
    }
}
