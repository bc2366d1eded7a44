//! The published table's rows and the paper's figures: one table each.

use fqvit_models::ModelName;

pub(crate) use crate::cli::Row;

impl Row {
    /// Every row, in the published order.
    pub(crate) const ALL: [Row; 7] =
        [Row::Fp32, Row::Minmax, Row::Ema, Row::Percentile, Row::Omse, Row::Ours888, Row::Ours884];

    /// The id on the command line and in the results.
    pub(crate) fn id(self) -> &'static str {
        match self {
            Row::Fp32 => "fp32",
            Row::Minmax => "minmax",
            Row::Ema => "ema",
            Row::Percentile => "percentile",
            Row::Omse => "omse",
            Row::Ours888 => "ours-8-8-8",
            Row::Ours884 => "ours-8-8-4",
        }
    }

    /// The method column of the published table.
    pub(crate) fn method(self) -> &'static str {
        match self {
            Row::Fp32 => "Full Precision",
            Row::Minmax => "MinMax",
            Row::Ema => "EMA",
            Row::Percentile => "Percentile",
            Row::Omse => "OMSE",
            Row::Ours888 | Row::Ours884 => "Ours",
        }
    }

    /// W/A/Attn bits.
    pub(crate) fn bits(self) -> &'static str {
        match self {
            Row::Fp32 => "32/32/32",
            Row::Ours884 => "8/8/4",
            _ => "8/8/8",
        }
    }

    /// The `fqvit-cli eval` flags of the row.
    pub(crate) fn flags(self) -> &'static [&'static str] {
        match self {
            Row::Fp32 => &[],
            Row::Minmax => &["--quant", "--quant-method", "minmax"],
            Row::Ema => &["--quant", "--quant-method", "ema"],
            Row::Percentile => &["--quant", "--quant-method", "percentile"],
            Row::Omse => &["--quant", "--quant-method", "omse"],
            Row::Ours888 => {
                &["--quant", "--ptf", "--lis", "--attn-bits", "8", "--quant-method", "minmax"]
            }
            Row::Ours884 => &["--quant", "--ptf", "--lis", "--quant-method", "minmax"],
        }
    }

    /// Whether the row calibrates (needs `<DATA>/train`).
    pub(crate) fn quantized(self) -> bool {
        self != Row::Fp32
    }
}

/// The eight models of the published table, in its column order: the registry's, which lists
/// ViT-Tiny (not in the paper) first.
pub(crate) const PUBLISHED: &[ModelName] = ModelName::ALL.split_at(1).1;

/// The column heading of a model.
pub(crate) fn heading(model: ModelName) -> &'static str {
    match model {
        ModelName::VitTiny => "ViT-T",
        ModelName::DeitTiny => "DeiT-T",
        ModelName::DeitSmall => "DeiT-S",
        ModelName::DeitBase => "DeiT-B",
        ModelName::VitBase => "ViT-B",
        ModelName::VitLarge => "ViT-L",
        ModelName::SwinTiny => "Swin-T",
        ModelName::SwinSmall => "Swin-S",
        ModelName::SwinBase => "Swin-B",
    }
}

/// A row of the paper's table: ours to run, or a method we only quote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PaperRow {
    /// A row we run.
    Run(Row),
    /// Quoted from the paper only (method, bits).
    Quoted(&'static str, &'static str),
}

/// The original README's table (top-1 on ImageNet val), columns as [`PUBLISHED`].
pub(crate) const PAPER: [(PaperRow, [Option<f64>; 8]); 9] = {
    use PaperRow::{Quoted, Run};
    const fn all(v: [f64; 8]) -> [Option<f64>; 8] {
        [
            Some(v[0]),
            Some(v[1]),
            Some(v[2]),
            Some(v[3]),
            Some(v[4]),
            Some(v[5]),
            Some(v[6]),
            Some(v[7]),
        ]
    }
    [
        (Run(Row::Fp32), all([72.21, 79.85, 81.85, 84.53, 85.81, 81.35, 83.20, 83.60])),
        (Run(Row::Minmax), all([70.94, 75.05, 78.02, 23.64, 3.37, 64.38, 74.37, 25.58])),
        (Run(Row::Ema), all([71.17, 75.71, 78.82, 30.30, 3.53, 70.81, 75.05, 28.00])),
        (Run(Row::Percentile), all([71.47, 76.57, 78.37, 46.69, 5.85, 78.78, 78.12, 40.93])),
        (Run(Row::Omse), all([71.30, 75.03, 79.57, 73.39, 11.32, 79.30, 78.96, 48.55])),
        (
            Quoted("Bit-Split", "8/8/8"),
            [None, Some(77.06), Some(79.42), None, None, None, None, None],
        ),
        (
            Quoted("PTQ for ViT", "8/8/8"),
            [None, Some(77.47), Some(80.48), None, None, None, None, None],
        ),
        (Run(Row::Ours888), all([71.61, 79.17, 81.20, 83.31, 85.03, 80.51, 82.71, 82.97])),
        (Run(Row::Ours884), all([71.07, 78.40, 80.85, 82.68, 84.89, 80.04, 82.47, 82.38])),
    ]
};

/// The paper's top-1 for a row we run, if the paper has that model.
pub(crate) fn paper_top1(row: Row, model: ModelName) -> Option<f64> {
    let col = PUBLISHED.iter().position(|&m| m == model)?;
    PAPER.iter().find(|(r, _)| *r == PaperRow::Run(row)).and_then(|(_, v)| v[col])
}
