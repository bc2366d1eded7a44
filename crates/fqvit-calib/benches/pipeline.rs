//! Float evaluation throughput on the shared sample (`cargo bench -p fqvit-calib`): decoding and
//! preprocessing alone, and the whole evaluation (data and ViT-Tiny forward), per image.

use divan::counter::ItemsCount;
use divan::{Bencher, black_box};
use fqvit_calib::data::{BadImages, ImageFolder, preprocess};
use fqvit_calib::decode::load_rgb;
use fqvit_calib::eval::{EvalOptions, Ties, evaluate};
use fqvit_models::weights::load_strict;
use fqvit_models::{Mode, ModelName, Preprocess, vit};
use indicatif::ProgressBar;
use rayon::prelude::*;

const IMAGES: usize = 200;

fn main() {
    divan::main();
}

use fqvit_testkit::shared_dir as shared;

fn val() -> ImageFolder {
    let mut folder = ImageFolder::open(&shared().join("imagenet-sample"), "val")
        .expect("../shared/imagenet-sample");
    folder.truncate(IMAGES);
    folder
}

/// Decode + resize + crop + normalise, in parallel as the loader does.
#[divan::bench(sample_count = 10, sample_size = 1)]
fn data_loading(bencher: Bencher) {
    let folder = val();
    bencher.counter(ItemsCount::new(IMAGES)).bench_local(|| {
        folder
            .samples()
            .par_iter()
            .map(|s| {
                preprocess(&load_rgb(&folder.root().join(&s.rel_path)).unwrap(), &Preprocess::VIT)
                    .len()
            })
            .sum::<usize>()
    });
}

/// The whole float evaluation of ViT-Tiny, batches of 100.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn float_eval(bencher: Bencher) {
    let folder = val();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = vit::Vit::new(&vs.root(), &vit::Config::vit_tiny());
    let weights = shared()
        .join("weights")
        .join(ModelName::VitTiny.weights_folder())
        .join("model.safetensors");
    load_strict(&vs, &weights).unwrap();
    let opts = EvalOptions {
        batch_size: 100,
        device: tch::Device::Cpu,
        bad_images: BadImages::Fail,
        ties: Ties::Torch,
    };
    bencher.counter(ItemsCount::new(IMAGES)).bench_local(|| {
        black_box(
            evaluate(&model, &mut Mode::Float, &folder, &opts, &ProgressBar::hidden())
                .unwrap()
                .top1,
        )
    });
}
