//! The results file: one JSON line per finished cell, appended whole (write-then-rename), so an
//! interrupted run never leaves half a line; shards write their own files and `render` merges.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::rows::Row;

/// How a cell ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Status {
    /// `fqvit-cli eval` succeeded; the figures are set.
    Ok,
    /// It failed; `error` and `log` say why.
    Failed,
}

/// One cell's line in the results file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CellRecord {
    /// Digest of the cell's inputs (model, row, flags, weights sha256, data, device): a cell is
    /// skipped when a finished line has the same key.
    pub(crate) key: String,
    pub(crate) status: Status,
    pub(crate) model: String,
    pub(crate) row: Row,
    pub(crate) method: String,
    pub(crate) bits: String,
    /// The `fqvit-cli eval` arguments after the model and data.
    pub(crate) args: Vec<String>,
    /// The experiment as `eval` resolved it.
    pub(crate) experiment: Option<serde_json::Value>,
    pub(crate) weights: PathBuf,
    pub(crate) weights_sha256: String,
    pub(crate) data: PathBuf,
    pub(crate) limit: Option<usize>,
    pub(crate) images: Option<u64>,
    pub(crate) top1: Option<f64>,
    pub(crate) top5: Option<f64>,
    pub(crate) calib_seconds: Option<f64>,
    pub(crate) calib_order: String,
    pub(crate) eval_seconds: Option<f64>,
    /// Wall time of the whole subprocess (loading included).
    pub(crate) cell_seconds: f64,
    /// `--device` as asked.
    pub(crate) device: String,
    /// What `eval` ran on (`Cpu`, `Cuda(0)`).
    pub(crate) device_used: Option<String>,
    /// The CPU model or GPU name.
    pub(crate) device_name: String,
    pub(crate) parameters: Option<u64>,
    pub(crate) img_size: u32,
    pub(crate) crop_pct: f64,
    pub(crate) interpolation: String,
    pub(crate) fqvit_version: String,
    pub(crate) git_commit: String,
    pub(crate) finished_unix: u64,
    /// The cell's `eval --json` (per-image predictions).
    pub(crate) result_json: PathBuf,
    /// The cell's stdout and stderr.
    pub(crate) log: PathBuf,
    /// Why it failed.
    pub(crate) error: Option<String>,
}

/// Every record of every `*.jsonl` in `dir`, files in name order, lines in file order. A line
/// that does not parse is reported and skipped (a hand-edited file loses only that line).
pub(crate) fn read_all(dir: &Path) -> Result<Vec<CellRecord>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    files.sort();
    let mut records = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            match serde_json::from_str(line) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(file = %file.display(), line = i + 1, error = %e, "skipping a line that is not a cell record")
                }
            }
        }
    }
    Ok(records)
}

/// Appends one record to `file` as a whole line: under an exclusive lock on `<file>.lock`
/// (two runs may share a results file), the new content goes to a temporary file of this
/// process, is synced, then renamed over `file`, so a kill leaves the old or the new file.
pub(crate) fn append(file: &Path, record: &CellRecord) -> Result<()> {
    let context = || format!("writing {}", file.display());
    let lock = std::fs::File::create(file.with_extension("jsonl.lock")).with_context(context)?;
    lock.lock().with_context(context)?;
    let mut text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&serde_json::to_string(record)?);
    text.push('\n');
    let tmp = file.with_extension(format!("jsonl.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        if let Some(dir) = file.parent() {
            // The rename itself survives a crash once the folder is synced.
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    // The lock is released when `lock` drops, after the rename.
    write().with_context(context)
}

/// The latest record of each (model, row), by finish time.
pub(crate) fn latest(
    records: Vec<CellRecord>,
) -> std::collections::BTreeMap<(String, Row), CellRecord> {
    let mut map = std::collections::BTreeMap::new();
    for r in records {
        let k = (r.model.clone(), r.row);
        if map.get(&k).is_none_or(|old: &CellRecord| old.finished_unix <= r.finished_unix) {
            map.insert(k, r);
        }
    }
    map
}
