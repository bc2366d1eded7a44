//! `fqvit-cli bench-table` (what `cargo xtask bench-table` runs): the published FQ-ViT table
//! regenerated end to end. `fetch` puts the pinned checkpoints in the HF cache, `run` runs each
//! (model, row) cell as its own `fqvit-cli eval --json` subprocess and appends a line to a
//! JSONL file, `render` turns the lines into tables.

pub(crate) mod records;
pub(crate) mod render;
pub(crate) mod rows;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use fqvit_models::ModelName;
use fqvit_models::weights::{HubCache, Network, WeightsSource, resolve, sha256_file};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

pub(crate) use crate::cli::Shard;
use crate::cli::{BenchTableArgs, DeviceArg, TableStep, flag_value};
use records::{CellRecord, Status};
use rows::Row;

impl Shard {
    /// `--shard`, else Slurm's array variables, else the whole table.
    fn resolve(arg: Option<Shard>) -> Result<Option<Shard>> {
        if arg.is_some() {
            return Ok(arg);
        }
        let var = |k| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(id), Some(count)) = (var("SLURM_ARRAY_TASK_ID"), var("SLURM_ARRAY_TASK_COUNT"))
        else {
            return Ok(None);
        };
        let num = |k: &str, v: &str| -> Result<usize> {
            v.parse().with_context(|| format!("{k}={v} is not a number"))
        };
        let min = var("SLURM_ARRAY_TASK_MIN").map_or(Ok(0), |v| num("SLURM_ARRAY_TASK_MIN", &v))?;
        let contiguous = match var("SLURM_ARRAY_TASK_MAX") {
            Some(max) => {
                num("SLURM_ARRAY_TASK_MAX", &max)? + 1
                    == min + num("SLURM_ARRAY_TASK_COUNT", &count)?
            }
            None => true,
        };
        anyhow::ensure!(
            contiguous,
            "the Slurm array is sparse or stepped (tasks {min}..={} but {count} of them): pass --shard I/N explicitly",
            var("SLURM_ARRAY_TASK_MAX").unwrap_or_default()
        );
        let index = num("SLURM_ARRAY_TASK_ID", &id)?
            .checked_sub(min)
            .context("SLURM_ARRAY_TASK_ID below SLURM_ARRAY_TASK_MIN")?;
        let shard: Shard = format!("{index}/{}", num("SLURM_ARRAY_TASK_COUNT", &count)?)
            .parse()
            .map_err(|e: String| anyhow::anyhow!("Slurm array variables: {e}"))?;
        Ok(Some(shard))
    }

    /// The results file of this shard.
    fn file_name(shard: Option<Shard>) -> String {
        match shard {
            None => "cells.jsonl".into(),
            Some(s) => format!("cells.shard-{}-of-{}.jsonl", s.index, s.count),
        }
    }
}

/// One cell of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cell {
    pub(crate) model: ModelName,
    pub(crate) row: Row,
}

/// The selected cells, models outer, rows inner; a shard keeps every `count`-th.
pub(crate) fn cells(models: &[ModelName], rows: &[Row], shard: Option<Shard>) -> Vec<Cell> {
    let all = models.iter().flat_map(|&model| rows.iter().map(move |&row| Cell { model, row }));
    all.enumerate()
        .filter(|(k, _)| shard.is_none_or(|s| k % s.count == s.index))
        .map(|(_, c)| c)
        .collect()
}

pub(crate) fn run(args: &BenchTableArgs) -> Result<()> {
    let models =
        if args.models.is_empty() { rows::PUBLISHED.to_vec() } else { parse_models(&args.models)? };
    let rows = if args.rows.is_empty() { Row::ALL.to_vec() } else { dedup(&args.rows) };
    match args.step {
        Some(TableStep::Fetch) => {
            let manifest = args.out.join("weights.json");
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("--out {}", args.out.display()))?;
            crate::output::check_writable(&manifest, "--out")?;
            write_manifest(&manifest, &fetch(args, &models)?)
        }
        Some(TableStep::Run) => run_cells(args, &models, &rows),
        Some(TableStep::Render) => render(args, &models),
        // `run` fetches what its cells need first.
        None => {
            let ran = run_cells(args, &models, &rows);
            if Shard::resolve(args.shard)?.is_some() {
                // Shards render once, after all of them (`render`), not each on its own.
                eprintln!(
                    "a shard does not render; run `bench-table render` when all have finished"
                );
            } else {
                render(args, &models)?;
            }
            ran
        }
    }
}

fn parse_models(names: &[String]) -> Result<Vec<ModelName>> {
    let mut models = Vec::new();
    for n in names {
        let m: ModelName = n.parse().with_context(|| format!("--models {n}"))?;
        if !models.contains(&m) {
            models.push(m);
        }
    }
    Ok(models)
}

fn dedup(rows: &[Row]) -> Vec<Row> {
    let mut seen = HashSet::new();
    rows.iter().copied().filter(|r| seen.insert(*r)).collect()
}

fn network(args: &BenchTableArgs) -> Network {
    if args.offline { Network::Offline } else { Network::Online }
}

/// Resolves (and, online, downloads) every checkpoint the cells need; fails listing every
/// missing one before anything runs. Returns each model's file and sha256.
fn fetch(
    args: &BenchTableArgs,
    models: &[ModelName],
) -> Result<BTreeMap<&'static str, (PathBuf, String)>> {
    let source = args.weights_dir.clone().map_or(WeightsSource::Hub, WeightsSource::Dir);
    let cache = HubCache::from_env();
    let (mut found, mut missing) = (BTreeMap::new(), Vec::new());
    for &model in models {
        match resolve(model, &source, network(args), &cache) {
            Ok(path) => {
                let sha = sha256_file(&path)?;
                let pin = model.hub();
                let note = if sha == pin.sha256 {
                    format!("= {}@{}", pin.repo, &pin.revision[..12])
                } else {
                    format!(
                        "differs from {}@{} ({})",
                        pin.repo,
                        &pin.revision[..12],
                        &pin.sha256[..12]
                    )
                };
                eprintln!("weights {model}: {} sha256 {} {note}", path.display(), &sha[..16]);
                found.insert(model.as_str(), (path, sha));
            }
            Err(e) => missing.push(format!("  {model}: {e}")),
        }
    }
    if !missing.is_empty() {
        bail!("{} checkpoint(s) missing, nothing was run:\n{}", missing.len(), missing.join("\n"));
    }
    Ok(found)
}

/// `weights.json` in `--out`: each model's resolved file and sha256, as `fetch` found them.
fn write_manifest(file: &Path, found: &BTreeMap<&'static str, (PathBuf, String)>) -> Result<()> {
    let manifest: BTreeMap<_, _> = found
        .iter()
        .map(|(model, (path, sha))| (*model, json!({ "path": path, "sha256": sha })))
        .collect();
    std::fs::write(file, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!("wrote {}", file.display());
    Ok(())
}

/// What every cell of one run shares.
struct RunContext {
    data: PathBuf,
    device_name: String,
    git_commit: String,
    results: PathBuf,
    cells_dir: PathBuf,
}

fn run_cells(args: &BenchTableArgs, models: &[ModelName], rows: &[Row]) -> Result<()> {
    let shard = Shard::resolve(args.shard)?;
    let results = args.out.join(Shard::file_name(shard));
    let cells_dir = args.out.join("cells");
    std::fs::create_dir_all(&cells_dir).with_context(|| {
        format!("--out {}: cannot create {}", args.out.display(), cells_dir.display())
    })?;
    crate::output::check_writable(&results, "--out")?;
    let data =
        args.data.as_deref().context("run needs --data DIR (train/ and val/ of ImageNet)")?;
    let need = |sub: &str| -> Result<()> {
        let dir = data.join(sub);
        anyhow::ensure!(
            dir.is_dir(),
            "--data {}: {} is not a folder",
            data.display(),
            dir.display()
        );
        Ok(())
    };
    need("val")?;
    if rows.iter().any(|r| r.quantized()) {
        need("train")?;
    }
    let data = data.canonicalize().with_context(|| format!("--data {}", data.display()))?;
    let todo = cells(models, rows, shard);
    let needed: Vec<ModelName> =
        models.iter().copied().filter(|m| todo.iter().any(|c| c.model == *m)).collect();
    let weights = fetch(args, &needed)?;
    let ctx = RunContext {
        data,
        device_name: device_name(args.device),
        git_commit: git_commit(),
        results,
        cells_dir,
    };
    // Finished cells by key, with the commit they ran at.
    let done: BTreeMap<String, String> = records::read_all(&args.out)?
        .into_iter()
        .filter(|r| r.status == Status::Ok)
        .map(|r| (r.key, r.git_commit))
        .collect();
    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{pos}/{len} cells [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    let (mut failed, mut ran_seconds, mut ran) = (Vec::new(), 0.0, 0usize);
    let keys: Vec<String> = todo.iter().map(|c| key(args, &ctx, c, &weights)).collect();
    let mut pending = keys.iter().filter(|k| args.force || !done.contains_key(*k)).count();
    for ((i, cell), key) in todo.iter().enumerate().zip(keys) {
        let (path, sha) = &weights[cell.model.as_str()];
        let what = format!("{} {}", cell.model, cell.row.id());
        if let Some(commit) = done.get(&key).filter(|_| !args.force) {
            // The code is not an input (a documentation commit must not rerun a table), but a
            // figure from other code is worth a word.
            let note = if *commit == ctx.git_commit {
                String::new()
            } else {
                format!(" (at {commit}; now {}: --force reruns it)", ctx.git_commit)
            };
            say(&bar, format!("[{}/{}] {what}: done before, skipped{note}", i + 1, todo.len()));
            bar.inc(1);
            continue;
        }
        bar.set_message(format!("running {what}"));
        let record = run_cell(args, &ctx, cell, path, sha, key)?;
        records::append(&ctx.results, &record)?;
        ran += 1;
        ran_seconds += record.cell_seconds;
        pending = pending.saturating_sub(1);
        let eta = ran_seconds / ran as f64 * pending as f64;
        let outcome = match record.status {
            Status::Ok => format!(
                "top-1 {:.2} top-5 {:.2} ({} images, calibration {:.0} s, evaluation {:.0} s)",
                record.top1.unwrap_or(f64::NAN),
                record.top5.unwrap_or(f64::NAN),
                record.images.unwrap_or(0),
                record.calib_seconds.unwrap_or(0.0),
                record.eval_seconds.unwrap_or(f64::NAN),
            ),
            Status::Failed => {
                failed.push(what.clone());
                format!(
                    "FAILED: {} (log {})",
                    record.error.as_deref().unwrap_or("?"),
                    record.log.display()
                )
            }
        };
        say(
            &bar,
            format!(
                "[{}/{}] {what}: {outcome}; {:.0} s; eta {}",
                i + 1,
                todo.len(),
                record.cell_seconds,
                hms(eta)
            ),
        );
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("results in {}", ctx.results.display());
    if !failed.is_empty() {
        bail!(
            "{} cell(s) failed: {} (their logs are in {})",
            failed.len(),
            failed.join(", "),
            ctx.cells_dir.display()
        );
    }
    Ok(())
}

/// A line above the progress bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) }
}

fn hms(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The `eval` arguments of a cell after model and data, without the paths of the weights and
/// of the result (those are not inputs: the weights enter by their sha256).
fn cell_args(args: &BenchTableArgs, row: Row) -> Vec<String> {
    let mut v: Vec<String> = row.flags().iter().map(|s| s.to_string()).collect();
    if row.quantized() {
        v.extend(["--calib-order".into(), flag_value(&args.calib_order)]);
        if let Some(n) = args.calib_batchsize {
            v.extend(["--calib-batchsize".into(), n.to_string()]);
        }
        if let Some(n) = args.calib_iter {
            v.extend(["--calib-iter".into(), n.to_string()]);
        }
    }
    v.extend(["--val-batchsize".into(), args.val_batchsize.to_string()]);
    if let Some(n) = args.limit {
        v.extend(["--limit".into(), n.to_string()]);
    }
    v.extend(["--device".into(), flag_value(&args.device)]);
    v
}

/// The digest of everything a cell's figures depend on.
fn key(
    args: &BenchTableArgs,
    ctx: &RunContext,
    cell: &Cell,
    weights: &BTreeMap<&'static str, (PathBuf, String)>,
) -> String {
    use sha2::Digest;
    let inputs = json!({
        "model": cell.model.as_str(),
        "row": cell.row.id(),
        "args": cell_args(args, cell.row),
        "weights_sha256": weights[cell.model.as_str()].1,
        "data": ctx.data,
    });
    let digest = sha2::Sha256::digest(inputs.to_string().as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn run_cell(
    args: &BenchTableArgs,
    ctx: &RunContext,
    cell: &Cell,
    weights: &Path,
    sha: &str,
    key: String,
) -> Result<CellRecord> {
    let stem = format!("{}.{}", cell.model, cell.row.id());
    let result_json = ctx.cells_dir.join(format!("{stem}.json"));
    let log = ctx.cells_dir.join(format!("{stem}.log"));
    // A stale result must not pass for this run's.
    let _ = std::fs::remove_file(&result_json);
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let cell_args = cell_args(args, cell.row);
    let exe = std::env::current_exe().context("locating fqvit-cli itself")?;
    let mut cmd = Command::new(exe);
    cmd.args(["-q", "eval", cell.model.as_str()])
        .arg(&ctx.data)
        .arg("--weights")
        .arg(weights)
        .args(&cell_args)
        .arg("--json")
        .arg(&result_json)
        // `--weights` and a weights folder from the environment would conflict.
        .env_remove("FQVIT_WEIGHTS_DIR")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().with_context(|| format!("opening {}", log.display()))?)
        .stderr(log_file);
    let start = Instant::now();
    let status = cmd.status().context("starting fqvit-cli eval")?;
    let cell_seconds = start.elapsed().as_secs_f64();
    let parsed: Option<Value> = status
        .success()
        .then(|| std::fs::read_to_string(&result_json).ok())
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok());
    let error = match (&parsed, status.success()) {
        (Some(_), _) => None,
        (None, true) => Some(format!("no readable result at {}", result_json.display())),
        (None, false) => Some(format!("{status}: {}", last_line(&log))),
    };
    let v = parsed.unwrap_or(Value::Null);
    let preprocess = cell.model.preprocess();
    Ok(CellRecord {
        key,
        status: if error.is_none() { Status::Ok } else { Status::Failed },
        model: cell.model.as_str().into(),
        row: cell.row,
        method: cell.row.method().into(),
        bits: cell.row.bits().into(),
        args: cell_args,
        experiment: v.get("experiment").cloned(),
        weights: weights.to_owned(),
        weights_sha256: sha.to_owned(),
        data: ctx.data.clone(),
        limit: args.limit,
        images: v["images"].as_u64(),
        top1: v["top1"].as_f64(),
        top5: v["top5"].as_f64(),
        calib_seconds: v["calibration"]["seconds"].as_f64(),
        calib_order: if cell.row.quantized() {
            flag_value(&args.calib_order)
        } else {
            "none".into()
        },
        eval_seconds: v["eval_seconds"].as_f64(),
        cell_seconds,
        device: flag_value(&args.device),
        device_used: v["device"].as_str().map(String::from),
        device_name: ctx.device_name.clone(),
        parameters: v["parameters"].as_u64(),
        img_size: preprocess.size,
        crop_pct: preprocess.crop_pct,
        interpolation: "bicubic".into(),
        fqvit_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: ctx.git_commit.clone(),
        finished_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        result_json,
        log,
        error,
    })
}

/// The last non-empty line of a log, for the one-line failure report.
fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|t| t.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_owned))
        .unwrap_or_else(|| "no output".into())
}

/// The CPU's model name, or the GPU's when CUDA will be used.
fn device_name(device: DeviceArg) -> String {
    let cuda = match device {
        DeviceArg::Cpu => false,
        DeviceArg::Cuda => true,
        DeviceArg::Auto => tch::Cuda::is_available(),
    };
    if cuda {
        let gpu = Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader", "--id=0"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        return gpu.filter(|g| !g.is_empty()).unwrap_or_else(|| "CUDA GPU".into());
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{} ({threads} threads)", cpu.unwrap_or_else(|| "CPU".into()))
}

/// The commit of the source tree this binary was built from, if it is still there (`+dirty`
/// with uncommitted changes).
fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}+dirty") } else { head }
        }
        None => "unknown".into(),
    }
}

fn render(args: &BenchTableArgs, models: &[ModelName]) -> Result<()> {
    let cells = records::latest(records::read_all(&args.out)?);
    let cols = render::columns(models, &cells);
    let table = format!(
        "Top-1 on ImageNet val: ours (the paper's, difference). Bit-Split and PTQ for ViT are the paper's figures only.\n\n{}\nSeconds per cell: calibration + evaluation (whole subprocess).\n\n{}\n{}",
        render::accuracy(&cols, &cells),
        render::timing(&cols, &cells),
        render::provenance(&cells),
    );
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let md = args.out.join("table.md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    let csv = args.out.join("results.csv");
    std::fs::write(&csv, render::csv(&cells))
        .with_context(|| format!("writing {}", csv.display()))?;
    println!("{table}");
    eprintln!("wrote {} and {}", md.display(), csv.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_cells() {
        let models = [ModelName::DeitTiny, ModelName::SwinBase, ModelName::VitLarge];
        let all = cells(&models, &Row::ALL, None);
        assert_eq!(all.len(), 21);
        for n in 1..=5 {
            let parts: Vec<Vec<Cell>> = (0..n)
                .map(|i| cells(&models, &Row::ALL, Some(Shard { index: i, count: n })))
                .collect();
            assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 21);
            for (k, cell) in all.iter().enumerate() {
                assert!(parts[k % n].contains(cell), "cell {k} in shard {}", k % n);
            }
        }
        assert_eq!("1/3".parse(), Ok(Shard { index: 1, count: 3 }));
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    fn record(model: &str, row: Row, status: Status, top1: f64, finished: u64) -> CellRecord {
        CellRecord {
            key: format!("{model}-{}", row.id()),
            status,
            model: model.into(),
            row,
            method: row.method().into(),
            bits: row.bits().into(),
            args: vec![],
            experiment: None,
            weights: "w".into(),
            weights_sha256: "00".into(),
            data: "d".into(),
            limit: None,
            images: Some(50_000),
            top1: (status == Status::Ok).then_some(top1),
            top5: (status == Status::Ok).then_some(95.0),
            calib_seconds: Some(10.0),
            calib_order: "shuffled".into(),
            eval_seconds: Some(100.0),
            cell_seconds: 120.0,
            device: "cpu".into(),
            device_used: Some("Cpu".into()),
            device_name: "a CPU, with a comma".into(),
            parameters: Some(22_050_664),
            img_size: 224,
            crop_pct: 0.875,
            interpolation: "bicubic".into(),
            fqvit_version: "0.1.0".into(),
            git_commit: "abc".into(),
            finished_unix: finished,
            result_json: "r.json".into(),
            log: "r.log".into(),
            error: (status == Status::Failed).then(|| "exit status: 1".into()),
        }
    }

    #[test]
    fn records_append_whole_and_the_latest_of_a_cell_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cells.jsonl");
        records::append(&file, &record("deit_small", Row::Fp32, Status::Failed, 0.0, 1)).unwrap();
        records::append(&file, &record("deit_small", Row::Fp32, Status::Ok, 79.86, 2)).unwrap();
        // A torn line left by some other writer is skipped, not fatal.
        let other = dir.path().join("cells.shard-1-of-2.jsonl");
        std::fs::write(&other, "{\"key\": \"trunc").unwrap();
        records::append(&other, &record("deit_tiny", Row::Ours884, Status::Ok, 71.0, 3)).unwrap();
        let all = records::read_all(dir.path()).unwrap();
        assert_eq!(all.len(), 3);
        let cells = records::latest(all);
        assert_eq!(cells.len(), 2);
        assert_eq!(cells[&("deit_small".into(), Row::Fp32)].status, Status::Ok);
        assert!(!dir.path().join("cells.jsonl.tmp").exists());
    }

    #[test]
    fn render_shows_ours_beside_the_paper_and_marks_gaps() {
        let mut cells = render::Cells::new();
        for r in [
            record("deit_small", Row::Fp32, Status::Ok, 79.86, 1),
            record("deit_small", Row::Minmax, Status::Failed, 0.0, 1),
            CellRecord { images: Some(100), ..record("vit_tiny", Row::Fp32, Status::Ok, 82.62, 1) },
        ] {
            cells.insert((r.model.clone(), r.row), r);
        }
        let cols = render::columns(&[ModelName::DeitSmall, ModelName::SwinTiny], &cells);
        assert_eq!(cols, [ModelName::VitTiny, ModelName::DeitSmall, ModelName::SwinTiny]);
        let table = render::accuracy(&cols, &cells);
        let line = |start: &str| table.lines().find(|l| l.starts_with(start)).unwrap().to_owned();
        assert_eq!(
            line("| Full Precision"),
            "| Full Precision | 32/32/32 | 82.62 (–) [100 images] | 79.86 (79.85, +0.01) | not run |"
        );
        assert_eq!(line("| MinMax"), "| MinMax | 8/8/8 | not run | **failed** | not run |");
        assert_eq!(line("| Bit-Split"), "| Bit-Split (paper only) | 8/8/8 | – | (77.06) | – |");
        assert_eq!(line("| crop_pct"), "| crop_pct (bicubic) | | 0.9 | 0.875 | 0.9 |");
        let csv = render::csv(&cells);
        assert_eq!(csv.lines().count(), 3, "{csv}");
        assert!(csv.contains("deit_small,79.860,20.140,95.000,5.000,22.05,224,0.875,bicubic,fp32,Full Precision,32/32/32,50000,10.0,100.0,\"a CPU, with a comma\",00"), "{csv}");
    }
}
