//! The real ViT-Tiny (shared weights) in float mode on a few shared images: the top-1 class is
//! the ground truth (German shepherd, koala, balance beam, silky terrier, spaghetti squash,
//! sunglass), through the whole data pipeline.

mod common;

use fqvit_calib::data::{BadImages, ImageFolder, class_index};
use fqvit_calib::eval::{EvalOptions, Ties, evaluate};
use fqvit_models::Mode;
use indicatif::ProgressBar;

const IMAGES: [&str; 6] = [
    "val/n02106662/ILSVRC2012_val_00004538.JPEG",
    "val/n01882714/ILSVRC2012_val_00008498.JPEG",
    "val/n02777292/ILSVRC2012_val_00012479.JPEG",
    "val/n02097658/ILSVRC2012_val_00040875.JPEG",
    "val/n07716906/ILSVRC2012_val_00033247.JPEG",
    "val/n04355933/ILSVRC2012_val_00040473.JPEG",
];

#[test]
fn float_vit_tiny_classifies_shared_images() {
    let (_vs, model) = common::vit_tiny();
    let mut folder = ImageFolder::open(&common::sample_dir(), "val").unwrap();
    folder.retain(|s| IMAGES.contains(&s.rel_path.as_str()));
    assert_eq!(folder.samples().len(), IMAGES.len());
    let opts = EvalOptions {
        batch_size: 4,
        device: tch::Device::Cpu,
        bad_images: BadImages::Fail,
        ties: Ties::Torch,
    };
    let report =
        evaluate(&model, &mut Mode::Float, &folder, &opts, &ProgressBar::hidden()).unwrap();
    for p in &report.predictions {
        let wnid = p.path.split('/').nth(1).unwrap();
        assert_eq!(Some(p.label), class_index(wnid));
        assert_eq!(p.top5[0], p.label, "{}: predicted {:?}", p.path, p.top5);
    }
    assert_eq!(report.top1, 100.0);
}

/// Our decoding and preprocessing equal timm's transform (Pillow bicubic, crop 0.9, mean = std
/// = 0.5) bit for bit on the images of fqvit-models' timm fixture.
#[test]
fn preprocessing_equals_timm_transform() {
    use fqvit_calib::data::preprocess;
    use fqvit_calib::decode::load_rgb;
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fqvit-models/tests/fixtures/timm/vit_tiny_shared.safetensors");
    let bytes = std::fs::read(&fixture).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let images: Vec<String> =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["images"]).unwrap();
    let timm: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(&fixture).unwrap().into_iter().collect();
    let timm = Vec::<f32>::try_from(timm["input"].view(-1)).unwrap();
    let pp = fqvit_models::ModelName::VitTiny.preprocess();
    let ours: Vec<f32> = images
        .iter()
        .flat_map(|p| preprocess(&load_rgb(&common::sample_dir().join(p)).unwrap(), &pp))
        .collect();
    assert_eq!(ours.len(), timm.len());
    let differ = ours.iter().zip(&timm).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} input values differ from timm's", ours.len());
}
