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

    /// The timm checkpoint on the Hugging Face hub.
    pub const fn hub_repo(self) -> &'static str {
        match self {
            ModelName::VitTiny => "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
            ModelName::DeitTiny => "timm/deit_tiny_patch16_224.fb_in1k",
            ModelName::DeitSmall => "timm/deit_small_patch16_224.fb_in1k",
            ModelName::DeitBase => "timm/deit_base_patch16_224.fb_in1k",
            ModelName::VitBase => "timm/vit_base_patch16_224.augreg_in21k_ft_in1k",
            ModelName::VitLarge => "timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
            ModelName::SwinTiny => "timm/swin_tiny_patch4_window7_224.ms_in1k",
            ModelName::SwinSmall => "timm/swin_small_patch4_window7_224.ms_in1k",
            ModelName::SwinBase => "timm/swin_base_patch4_window7_224.ms_in1k",
        }
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
