//! `bench-table render`: the published table's layout with our figures beside the paper's, a
//! timing table, and a CSV with timm `validate.py`'s columns. Works on partial results.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fqvit_models::ModelName;

use super::records::{CellRecord, Status};
use super::rows::{PAPER, PUBLISHED, PaperRow, Row, heading, paper_top1};

/// Cells by (model, row).
pub(crate) type Cells = BTreeMap<(String, Row), CellRecord>;

/// The columns: the requested models, then any other model with results, in registry order.
pub(crate) fn columns(requested: &[ModelName], cells: &Cells) -> Vec<ModelName> {
    ModelName::ALL
        .into_iter()
        .filter(|m| requested.contains(m) || cells.keys().any(|(name, _)| name == m.as_str()))
        .collect()
}

/// The image count most cells were evaluated on.
fn usual_images(cells: &Cells) -> Option<u64> {
    let mut counts = BTreeMap::<u64, usize>::new();
    for r in cells.values().filter(|r| r.status == Status::Ok) {
        *counts.entry(r.images.unwrap_or(0)).or_default() += 1;
    }
    counts.into_iter().max_by_key(|&(images, n)| (n, images)).map(|(images, _)| images)
}

fn cell_text(cells: &Cells, model: ModelName, row: Row, usual: Option<u64>) -> String {
    let Some(r) = cells.get(&(model.as_str().to_owned(), row)) else {
        return "not run".into();
    };
    // A cell on another image count (an earlier `--limit` run, say) is marked, not hidden.
    let mark = match r.images {
        Some(n) if Some(n) != usual => format!(" [{n} images]"),
        _ => String::new(),
    };
    match (r.status, r.top1) {
        (Status::Ok, Some(top1)) => match paper_top1(row, model) {
            Some(paper) => format!("{top1:.2} ({paper:.2}, {:+.2}){mark}", top1 - paper),
            None => format!("{top1:.2} (–){mark}"),
        },
        _ => "**failed**".into(),
    }
}

/// The accuracy table (markdown).
pub(crate) fn accuracy(cols: &[ModelName], cells: &Cells) -> String {
    let mut s = String::new();
    let usual = usual_images(cells);
    let heads: Vec<&str> = cols.iter().map(|&m| heading(m)).collect();
    let _ = writeln!(s, "| Method | W/A/Attn Bits | {} |", heads.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(cols.len()));
    for (paper_row, figures) in PAPER {
        let (method, bits, texts): (String, &str, Vec<String>) = match paper_row {
            PaperRow::Run(row) => (
                row.method().to_owned(),
                row.bits(),
                cols.iter().map(|&m| cell_text(cells, m, row, usual)).collect(),
            ),
            PaperRow::Quoted(method, bits) => (
                format!("{method} (paper only)"),
                bits,
                cols.iter()
                    .map(|m| {
                        PUBLISHED
                            .iter()
                            .position(|p| p == m)
                            .and_then(|i| figures[i])
                            .map_or("–".into(), |v| format!("({v:.2})"))
                    })
                    .collect(),
            ),
        };
        let _ = writeln!(s, "| {method} | {bits} | {} |", texts.join(" | "));
    }
    let crops: Vec<String> = cols.iter().map(|m| format!("{}", m.preprocess().crop_pct)).collect();
    let _ = writeln!(s, "| crop_pct (bicubic) | | {} |", crops.join(" | "));
    s
}

/// Seconds per cell: calibration + evaluation (and the whole subprocess).
pub(crate) fn timing(cols: &[ModelName], cells: &Cells) -> String {
    let mut s = String::new();
    let heads: Vec<&str> = cols.iter().map(|&m| heading(m)).collect();
    let _ = writeln!(s, "| Method | W/A/Attn Bits | {} |", heads.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(cols.len()));
    for row in Row::ALL {
        let texts: Vec<String> = cols
            .iter()
            .map(|m| match cells.get(&(m.as_str().to_owned(), row)) {
                Some(r) if r.status == Status::Ok => format!(
                    "{:.0} + {:.0} ({:.0})",
                    r.calib_seconds.unwrap_or(0.0),
                    r.eval_seconds.unwrap_or(f64::NAN),
                    r.cell_seconds
                ),
                Some(_) => "failed".into(),
                None => "–".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} | {} |", row.method(), row.bits(), texts.join(" | "));
    }
    s
}

/// The images, data and devices behind the figures, and the calibration orders, one line each
/// distinct value.
pub(crate) fn provenance(cells: &Cells) -> String {
    let mut seen = std::collections::BTreeSet::new();
    for r in cells.values().filter(|r| r.status == Status::Ok) {
        seen.insert(format!(
            "{} val images of {}, on {} ({}), fqvit {} at {}",
            r.images.unwrap_or(0),
            r.data.display(),
            r.device_name,
            r.device_used.as_deref().unwrap_or("?"),
            r.fqvit_version,
            r.git_commit
        ));
        if r.row.quantized() {
            seen.insert(format!("calibration order: {}", r.calib_order));
        }
    }
    seen.into_iter().map(|l| format!("- {l}\n")).collect()
}

/// timm `validate.py`'s columns, then ours.
pub(crate) fn csv(cells: &Cells) -> String {
    let mut s = String::from(
        "model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation,row,method,bits,images,calib_seconds,eval_seconds,device,weights_sha256\n",
    );
    for r in cells.values().filter(|r| r.status == Status::Ok) {
        let (top1, top5) = (r.top1.unwrap_or(f64::NAN), r.top5.unwrap_or(f64::NAN));
        let _ = writeln!(
            s,
            "{},{top1:.3},{:.3},{top5:.3},{:.3},{:.2},{},{},{},{},{},{},{},{:.1},{:.1},{},{}",
            r.model,
            100.0 - top1,
            100.0 - top5,
            r.parameters.map_or(f64::NAN, |p| p as f64 / 1e6),
            r.img_size,
            r.crop_pct,
            r.interpolation,
            r.row.id(),
            r.method,
            r.bits,
            r.images.unwrap_or(0),
            r.calib_seconds.unwrap_or(0.0),
            r.eval_seconds.unwrap_or(f64::NAN),
            csv_field(&r.device_name),
            r.weights_sha256
        );
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.into() }
}
