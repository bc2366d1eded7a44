//! `cargo xtask bench-engine`: the integer engine against libtorch fp32 and the simulation, per
//! instruction set, as a markdown table. Each row is one `fqvit-cli bench --engine int` process
//! (random weights), so its figures come from one run; the `avx2` rows hold libtorch, MKL and
//! oneDNN to AVX2 and the engine too (`--isa avx2`: its GEMM kernel and every loop), so an
//! AVX-512 machine measures what an AVX2-only one runs. JSON in `target/bench-engine/`.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::ci::AVX2_ENV;
use crate::{cargo, project_root, run};

/// An instruction-set setting: its `--isas` name, its label, the engine's flags, and the
/// environment.
struct Isa {
    key: &'static str,
    label: &'static str,
    engine: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// The engine held to AVX2, as libtorch is by [`AVX2_ENV`].
pub(crate) const ENGINE_AVX2: &[&str] = &["--isa", "avx2"];

const ISAS: [Isa; 3] = [
    Isa { key: "native", label: "native", engine: &[], env: &[] },
    Isa { key: "avx2", label: "AVX2", engine: ENGINE_AVX2, env: AVX2_ENV },
    Isa {
        key: "loops",
        label: "AVX2, loops",
        engine: &["--isa", "avx2", "--gemm-kernel", "loops"],
        env: AVX2_ENV,
    },
];

/// One `fqvit-cli bench --engine int` process: its figures go to `json`, nothing to stdout.
pub(crate) struct Bench<'a> {
    pub(crate) model: &'a str,
    pub(crate) batch: u32,
    pub(crate) iters: u32,
    pub(crate) env: &'a [(&'a str, &'a str)],
    /// The engine's flags (`--isa`, `--gemm-kernel`) where they are held.
    pub(crate) engine: &'a [&'a str],
}

impl Bench<'_> {
    pub(crate) fn command(
        &self,
        cli: &std::path::Path,
        json: &std::path::Path,
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(cli);
        cmd.args(["-q", "bench", self.model, "--device", "cpu", "--engine", "int"])
            .args(["--batch-size", &self.batch.to_string(), "--iters", &self.iters.to_string()])
            .envs(self.env.iter().copied())
            // The figures come from the JSON file; the table goes to stdout alone.
            .stdout(std::process::Stdio::null())
            .arg("--json")
            .arg(json)
            .args(self.engine);
        cmd
    }
}

pub(crate) fn bench_engine(
    models: &[String],
    batches: &[u32],
    isas: &[String],
    iters: u32,
) -> Result<()> {
    for isa in isas {
        anyhow::ensure!(
            ISAS.iter().any(|i| i.key == isa),
            "--isas: unknown {isa:?} (native, avx2, loops)"
        );
    }
    run(cargo().args(["build", "--release", "-p", "fqvit-cli"]))?;
    let cli = project_root().join("target/release/fqvit-cli");
    let out_dir = project_root().join("target/bench-engine");
    std::fs::create_dir_all(&out_dir)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(str::to_owned))
        .and_then(|l| l.split(':').nth(1).map(|s| s.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let mut lines = vec![
        "| model | batch | ISA | libtorch fp32 img/s | simulation | engine | engine / fp32 | GEMM Gops/s | GEMM kernel |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    for model in models {
        for &batch in batches {
            for isa in ISAS.iter().filter(|i| isas.iter().any(|s| s == i.key)) {
                let json = out_dir.join(format!("{model}.{batch}.{}.json", isa.key));
                let bench = Bench { model, batch, iters, env: isa.env, engine: isa.engine };
                run(&mut bench.command(&cli, &json))?;
                let v: Value = serde_json::from_str(
                    &std::fs::read_to_string(&json)
                        .with_context(|| format!("reading {}", json.display()))?,
                )?;
                let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                let (float, int) = (f("float_images_per_s"), f("int_images_per_s"));
                let line = format!(
                    "| `{model}` | {batch} | {} | {float:.1} | {:.1} | {int:.1} | {:.2} | {:.0} | {} |",
                    isa.label,
                    f("quantized_images_per_s"),
                    int / float,
                    f("int_gemm_ops_per_s") / 1e9,
                    v["int_gemm_kernel"].as_str().unwrap_or("?"),
                );
                eprintln!("{line}");
                lines.push(line);
            }
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!("{cpu}, {threads} threads; {iters} timed forwards per mode\n");
    println!("{}", lines.join("\n"));
    Ok(())
}
