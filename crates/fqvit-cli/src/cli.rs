//! The command line (clap). Doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// Post-training quantization of vision transformers, fully quantized the FQ-ViT way.
#[derive(Parser)]
#[command(name = "fqvit-cli", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Less logging.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) quiet: u8,
    /// Give freed memory back to the system (glibc's defaults): lower peak memory, slower
    /// (by default large freed blocks stay in the heap for reuse; docs/speed.md).
    #[arg(long, global = true, env = "FQVIT_LOW_MEMORY")]
    pub(crate) low_memory: bool,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Evaluate a model on <DATA>/val, optionally calibrated and quantized on <DATA>/train.
    Eval(Box<EvalArgs>),
    /// Calibrate on <DATA>/train and write the quantized model and its parameters to a file.
    Quantize(Box<QuantizeArgs>),
    /// Convert a checkpoint the paper used (DeiT or Swin `.pth`, ViT AugReg `.npz`) to timm's
    /// safetensors layout, checked strictly against the model.
    Convert(ConvertArgs),
    /// Throughput and peak memory of a model with random weights, float and quantized
    /// (8/8/4 `--ptf --lis`, calibrated on random images): what `cargo xtask bench-models` runs.
    Bench(BenchArgs),
    /// The published FQ-ViT table end to end: fetch the pinned checkpoints, run every
    /// (model, row) cell as its own `eval` process (resumable JSONL), render the tables.
    BenchTable(BenchTableArgs),
    /// Report what libtorch sees (version, CUDA).
    Doctor,
}

/// A step of `bench-table`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum TableStep {
    /// Put every checkpoint the cells need in the HF cache (or check them with --offline).
    Fetch,
    /// Run the cells not yet finished with the same inputs, one `eval` process each.
    Run,
    /// The markdown tables and CSV from the results so far.
    Render,
}

/// A row of the published table that we run.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Row {
    /// Full precision (32/32/32).
    Fp32,
    /// `--quant --quant-method minmax` (8/8/8, float LayerNorm, uint8 softmax).
    Minmax,
    /// `--quant --quant-method ema`.
    Ema,
    /// `--quant --quant-method percentile`.
    Percentile,
    /// `--quant --quant-method omse`.
    Omse,
    /// Ours 8/8/8: minmax `--ptf --lis --attn-bits 8` (8/8/8 with LIS, docs/cli.md).
    #[value(name = "ours-8-8-8")]
    #[serde(rename = "ours-8-8-8")]
    Ours888,
    /// Ours 8/8/4: minmax `--ptf --lis`.
    #[value(name = "ours-8-8-4")]
    #[serde(rename = "ours-8-8-4")]
    Ours884,
}

/// Cells `k` with `k mod count = index` of the full cell list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) index: usize,
    pub(crate) count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// `fqvit-cli bench-table` (`cargo xtask bench-table`).
#[derive(Args, Debug)]
pub(crate) struct BenchTableArgs {
    /// fetch, run or render; all three when omitted.
    #[arg(value_enum)]
    pub(crate) step: Option<TableStep>,
    /// ImageNet folder with train/<wnid>/ (calibration) and val/<wnid>/ (evaluation).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Models, comma-separated (the published table's eight by default; vit_tiny on request).
    #[arg(long, value_delimiter = ',')]
    pub(crate) models: Vec<String>,
    /// Rows, comma-separated [default: all seven].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) rows: Vec<Row>,
    /// Where every cell runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub(crate) device: DeviceArg,
    /// Evaluate only the first N validation images (sorted order).
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Results folder: the JSONL files, each cell's JSON and log, the rendered tables.
    #[arg(long, default_value = "target/bench-table")]
    pub(crate) out: PathBuf,
    /// Never touch the network: the HF cache and --weights-dir only; missing files are listed.
    #[arg(long, env = "HF_HUB_OFFLINE")]
    pub(crate) offline: bool,
    /// Folder with <timm name>/model.safetensors, looked at before the HF cache.
    #[arg(long, env = "FQVIT_WEIGHTS_DIR")]
    pub(crate) weights_dir: Option<PathBuf>,
    /// Run only cells k with k mod N = I (default: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT).
    #[arg(long, value_name = "I/N")]
    pub(crate) shard: Option<Shard>,
    /// Rerun finished cells too.
    #[arg(long)]
    pub(crate) force: bool,
    /// Calibration image order.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) calib_order: fqvit_calib::experiment::CalibOrder,
    /// Calibration images per batch [eval's default: 100].
    #[arg(long)]
    pub(crate) calib_batchsize: Option<usize>,
    /// Calibration batches [eval's default: 10].
    #[arg(long)]
    pub(crate) calib_iter: Option<usize>,
    /// Validation images per batch.
    #[arg(long, default_value_t = 100)]
    pub(crate) val_batchsize: usize,
}

/// `fqvit-cli bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// The model (its architecture; the weights are random).
    pub(crate) model: String,
    /// Images per forward.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: i64,
    /// Timed forwards per mode (after one warm-up forward).
    #[arg(long, default_value_t = 3)]
    pub(crate) iters: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub(crate) device: DeviceArg,
    /// Write the figures as JSON here too.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Also time the integer engine (`int_images_per_s`), in this process, on the same model.
    #[arg(long, value_enum, default_value_t = EngineArg::Sim)]
    pub(crate) engine: EngineArg,
    #[command(flatten)]
    pub(crate) int: EngineFlags,
}

/// How the integer engine runs; each flag needs `--engine int`. Every choice gives the same
/// integers: they are for benchmarks and tests.
#[derive(Args, Clone, Copy, Debug)]
pub(crate) struct EngineFlags {
    /// With `--engine int`: the int8 GEMM kernel (`avx512-vnni`, `rten`, `avx2-pairs`,
    /// `loops`); by default the fastest this CPU runs exactly within `--isa`.
    #[arg(long, value_name = "KERNEL")]
    pub(crate) gemm_kernel: Option<fqvit_engine::KernelKind>,
    /// With `--engine int`: the widest instruction set the engine may use (default `native`);
    /// `avx2` runs on any x86 CPU with AVX2 exactly what an AVX2-only CPU runs.
    #[arg(long, value_enum)]
    pub(crate) isa: Option<fqvit_engine::Isa>,
}

impl EngineFlags {
    /// The engine's options, refusing a flag given without `--engine int` or a kernel this CPU
    /// does not run.
    pub(crate) fn options(self, engine: EngineArg) -> anyhow::Result<fqvit_engine::Options> {
        if engine != EngineArg::Int {
            if self.gemm_kernel.is_some() {
                anyhow::bail!(
                    "--gemm-kernel chooses the integer engine's GEMM kernel: add --engine int"
                );
            }
            if self.isa.is_some() {
                anyhow::bail!("--isa holds the integer engine's instruction set: add --engine int");
            }
        }
        let options =
            fqvit_engine::Options { gemm: self.gemm_kernel, isa: self.isa.unwrap_or_default() };
        options.kernel()?;
        Ok(options)
    }
}

/// A value's spelling on the command line (clap's name of the variant; a test holds it equal to
/// the TOML spelling where the type is also read from configs).
pub(crate) fn flag_value<T: ValueEnum>(value: &T) -> String {
    value.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default()
}

/// What runs the quantized model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum EngineArg {
    /// The simulation: libtorch float tensors on fake-quantized values, as the original.
    Sim,
    /// `fqvit-engine`: integer arithmetic only, on the CPU, from a qparams artifact.
    Int,
}

/// `fqvit-cli convert`.
#[derive(Args, Debug)]
pub(crate) struct ConvertArgs {
    /// The model the checkpoint is for (e.g. `deit_small`, `swin_tiny`, `vit_base`).
    pub(crate) model: String,
    /// The original checkpoint: `.pth` (DeiT, Swin) or `.npz` (ViT AugReg).
    pub(crate) input: PathBuf,
    /// Where to write the timm-layout safetensors (e.g. `<weights-dir>/<timm name>/model.safetensors`).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
}

/// Which device runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeviceArg {
    /// CUDA when available, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA GPU.
    Cuda,
}

/// Where the model and its weights come from.
#[derive(Args, Debug)]
pub(crate) struct ModelArgs {
    /// Model: vit_tiny, deit_tiny, deit_small, deit_base, vit_base, vit_large, swin_tiny,
    /// swin_small, swin_base.
    pub(crate) model: String,
    /// ImageNet folder with train/<wnid>/ and val/<wnid>/.
    pub(crate) data: PathBuf,
    /// A timm safetensors weights file.
    #[arg(long, conflicts_with = "weights_dir")]
    pub(crate) weights: Option<PathBuf>,
    /// Folder with <timm name>/model.safetensors; else the Hugging Face hub.
    /// Not needed with `eval --qparams`, which carries the weights.
    #[arg(long, env = "FQVIT_WEIGHTS_DIR")]
    pub(crate) weights_dir: Option<PathBuf>,
    /// Never touch the network: weights from --weights, --weights-dir or the HF cache only.
    #[arg(long, env = "HF_HUB_OFFLINE")]
    pub(crate) offline: bool,
    /// Device.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) device: DeviceArg,
}

/// The quantization experiment: a config file, then these flags on top.
#[derive(Args, Debug)]
pub(crate) struct QuantArgs {
    /// Experiment settings (TOML, see configs/); flags override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Quantize (calibrate on <DATA>/train, then evaluate quantized).
    #[arg(long)]
    pub(crate) quant: bool,
    /// Power-of-Two Factor on LayerNorm inputs and integer LayerNorm.
    #[arg(long)]
    pub(crate) ptf: bool,
    /// Log-Int-Softmax.
    #[arg(long)]
    pub(crate) lis: bool,
    /// Activation observer [default: minmax].
    #[arg(long, value_enum)]
    pub(crate) quant_method: Option<fqvit_calib::experiment::Method>,
    /// Weight observer, per output channel [default: minmax, the original's]; omse shrinks each
    /// channel's range to the least squared error of its codes.
    #[arg(long, value_enum)]
    pub(crate) weight_method: Option<fqvit_calib::experiment::WeightMethod>,
    /// How each weight takes its code on its channel's grid [default: nearest, the original's];
    /// gptq chooses each linear layer's (and the patch embedding's) codes from its inputs over
    /// the calibration images.
    #[arg(long, value_enum)]
    pub(crate) weight_rounding: Option<fqvit_calib::experiment::WeightRounding>,
    /// Fold each linear layer's expected weight-quantization error into its bias, from its
    /// mean input over the calibration images.
    #[arg(long)]
    pub(crate) bias_correction: bool,
    /// Reparameterize the block LayerNorms' outputs (RepQ-ViT): a first float pass over the
    /// calibration images takes each channel's range, and γ, β and the next linear layer absorb
    /// per-channel scales so that norm-out's layer-wise grid acts as a per-channel one.
    #[arg(long)]
    pub(crate) reparam_norm_out: bool,
    /// Bits of the residual stream, the LayerNorm inputs [default: the activation bits]:
    /// 2..=15; PTF factors there are capped at 15 − bits.
    #[arg(long)]
    pub(crate) residual_bits: Option<u8>,
    /// Log2 code bits of Log-Int-Softmax [default: 4].
    /// (2..=8; needs --lis).
    #[arg(long)]
    pub(crate) attn_bits: Option<fqvit_ops::softmax::LisBits>,
    /// Run Log-Int-Softmax's integer exponential on a grid 2^K times finer than its input's
    /// scale [default: 0, the original's] (0..=8; needs --lis): coarse attention scores then
    /// get an exponential whose base is right.
    #[arg(long, value_name = "K")]
    pub(crate) lis_exp_shift: Option<fqvit_ops::softmax::ExpShift>,
    /// The integer LayerNorm's square root [default: libtorch]: libtorch's float32 sqrt (the
    /// original's; its rounding depends on the CPU), exact (correctly rounded), or integer
    /// (every per-token step in integers, as the integer engine).
    #[arg(long, value_enum)]
    pub(crate) layer_norm_sqrt: Option<fqvit_calib::experiment::StdSqrt>,
    /// What Log-Int-Softmax reads in the quantized forward [default: float, the original's];
    /// `rounded` is the integer engine's input. Also with --qparams.
    #[arg(long, value_enum)]
    pub(crate) lis_input: Option<fqvit_calib::experiment::LisInput>,
    /// Leave these site groups in float in the quantized forward (a research tool: which
    /// quantization costs the accuracy): weights, residual, norm-out, qkv-out, attn-scores,
    /// attn-probs, context, proj-out, mlp-hidden, mlp-out, logits. Also with --qparams.
    #[arg(long, value_delimiter = ',')]
    pub(crate) float_sites: Vec<fqvit_models::SiteGroup>,
    /// Quantize these activation site groups with Power-of-Two Factors (per-channel s·2^k)
    /// instead of one scale, e.g. mlp-out (fc2's output before the residual add).
    #[arg(long, value_delimiter = ',')]
    pub(crate) ptf_sites: Vec<fqvit_models::SiteGroup>,
    /// The largest PTF factor α, 0..=7: channel scales base·2^α [default: 3, the original's].
    #[arg(long)]
    pub(crate) ptf_max_factor: Option<fqvit_ops::PtfFactor>,
    /// The range PTF sites take their largest scale and zero point from [default: min-max, the
    /// original's]; symmetric centres the zero point.
    #[arg(long, value_enum)]
    pub(crate) ptf_range: Option<fqvit_calib::experiment::PtfRange>,
    /// Calibration images per batch [default: 100].
    #[arg(long)]
    pub(crate) calib_batchsize: Option<usize>,
    /// Calibration batches [default: 10].
    #[arg(long)]
    pub(crate) calib_iter: Option<usize>,
    /// Calibration image order [default: shuffled].
    #[arg(long, value_enum)]
    pub(crate) calib_order: Option<fqvit_calib::experiment::CalibOrder>,
    /// Shuffle seed [default: 0].
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Hold this many images of <DATA>/train out of calibration (the last of train shuffled
    /// with --seed), for `eval --on dev` [default: 0].
    #[arg(long)]
    pub(crate) holdout: Option<usize>,
}

/// The images `eval` evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum EvalOn {
    /// <DATA>/val.
    Val,
    /// The development images: the part of <DATA>/train that --holdout keeps out of
    /// calibration (choose settings here, report val once).
    Dev,
}

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) quant: QuantArgs,
    /// Validation images per batch.
    #[arg(long, default_value_t = 100)]
    pub(crate) val_batchsize: usize,
    /// Evaluate only the first N validation images (sorted order).
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Which images to evaluate.
    #[arg(long, value_enum, default_value_t = EvalOn::Val)]
    pub(crate) on: EvalOn,
    /// Skip undecodable images with a warning (counted in the results) instead of stopping.
    #[arg(long)]
    pub(crate) skip_bad: bool,
    /// How equal logits rank (quantized logits tie often): libtorch's topk on the CPU as the
    /// original, or the lower class index first.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) ties: fqvit_calib::eval::Ties,
    /// Write the results, configuration and per-image predictions to this JSON file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Evaluate with the parameters and int8 weights of a `quantize` artifact (no calibration).
    #[arg(long)]
    pub(crate) qparams: Option<PathBuf>,
    /// What runs the quantized model: the float simulation, or the integer engine (from
    /// `--qparams`, or from an artifact written after calibrating; needs PTF and LIS).
    #[arg(long, value_enum, default_value_t = EngineArg::Sim)]
    pub(crate) engine: EngineArg,
    /// With `--engine int`: compare the engine's codes with the simulation's at every site on
    /// the first N val images, free-running and with each op fed the simulation's codes.
    #[arg(long, value_name = "N")]
    pub(crate) site_agreement: Option<usize>,
    #[command(flatten)]
    pub(crate) int: EngineFlags,
}

#[derive(Args, Debug)]
pub(crate) struct QuantizeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) quant: QuantArgs,
    /// The artifact to write (safetensors); a TOML summary goes beside it (`.toml`).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
}
