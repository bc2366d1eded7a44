//! Architecture invariants (ARCHITECTURE.md), checked from `cargo metadata` and the sources.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cargo;

/// (crate, dependency it must not have in `[dependencies]`, why).
const FORBIDDEN: &[(&str, &str, &str)] = &[
    ("fqvit-ops", "tch", "the integer kernels are usable without libtorch"),
    ("fqvit-models", "fqvit-observers", "models know nothing about calibration algorithms"),
    ("fqvit-models", "fqvit-calib", "models know nothing about calibration"),
    ("fqvit-observers", "fqvit-models", "observers see tensors, not models"),
    ("fqvit-tensor", "fqvit-models", "tensor arithmetic knows no model"),
    ("fqvit-tensor", "fqvit-observers", "tensor arithmetic knows no calibration"),
    ("fqvit-engine", "tch", "the integer engine runs without libtorch"),
    ("fqvit-engine", "fqvit-models", "the engine runs programs, it does not rebuild models"),
    ("fqvit-program", "tch", "programs are plain data"),
];

/// The only files allowed to contain unsafe code, each with a `SAFETY` note per block:
/// glibc's mallopt, CPU tensors seen as slices for the fused passes, the entry into the
/// AVX-512 VNNI GEMM kernel (no safe wrapper exists for `vpdpbusd`), and GELU's and
/// Log-Int-Softmax's table lookups as vector gathers (a gather reads through a pointer; its
/// indices are clamped to the table).
const UNSAFE_SITES: &[&str] = &[
    "crates/fqvit-cli/src/alloc.rs",
    "crates/fqvit-tensor/src/cpu.rs",
    "crates/fqvit-engine/src/gemm/vnni.rs",
    "crates/fqvit-engine/src/gelu/lanes.rs",
    "crates/fqvit-ops/src/softmax/gather.rs",
];

/// The only files that seed libtorch's global generator: the test lock that makes seeded draws
/// independent of the test runner, and `bench`'s random weights.
const SEED_SITES: &[&str] =
    &["crates/fqvit-testkit/src/lib.rs", "crates/fqvit-cli/src/commands/bench.rs"];

/// Dependencies only binaries may have.
const BINARY_ONLY: &[&str] = &["anyhow", "clap", "tracing-subscriber", "toml"];

pub(crate) fn tidy() -> Result<()> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let mut problems = Vec::new();
    for pkg in meta["packages"].as_array().context("no packages in cargo metadata")? {
        let name = pkg["name"].as_str().unwrap_or_default();
        let deps: Vec<(&str, &str, bool)> = pkg["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or_default(),
                    d["kind"].as_str().unwrap_or("normal"),
                    d["optional"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        for &(krate, forbidden, why) in FORBIDDEN {
            if name == krate && deps.iter().any(|&(d, ..)| d == forbidden) {
                problems.push(format!("{krate} depends on {forbidden}: {why}"));
            }
        }
        if name == "xtask" && deps.iter().any(|&(d, ..)| d == "tch" || d.starts_with("fqvit-")) {
            problems.push(
                "xtask depends on tch or a workspace crate: it must build before libtorch exists"
                    .into(),
            );
        }
        let is_binary = name == "xtask" || name == "fqvit-cli";
        for &(dep, kind, optional) in &deps {
            // A library's optional `clap` feature derives `ValueEnum` on its own setting types,
            // so that the command line parses them directly.
            let feature_only = optional && dep == "clap";
            if !is_binary && kind == "normal" && BINARY_ONLY.contains(&dep) && !feature_only {
                problems
                    .push(format!("library {name} depends on {dep}: only fqvit-cli and xtask may"));
            }
        }
    }
    for dir in ["crates", "tests"] {
        scan_sources(&crate::project_root().join(dir), &mut problems)?;
    }
    for entry in std::fs::read_dir(crate::project_root().join("crates"))? {
        let src = entry?.path().join("src");
        if src.is_dir() {
            import_circles(&src, &mut problems)?;
        }
    }
    if !problems.is_empty() {
        bail!("tidy found {} problem(s):\n  {}", problems.len(), problems.join("\n  "));
    }
    eprintln!("xtask tidy: invariants hold");
    Ok(())
}

fn scan_sources(dir: &Path, problems: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            scan_sources(&path, problems)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)?;
            // The measured needs for unsafe (see those files); anything else is refused here,
            // since the workspace lint is `deny` so that these sites can exist.
            let unsafe_allowed = UNSAFE_SITES.iter().any(|site| path.ends_with(site));
            let seed_allowed = SEED_SITES.iter().any(|site| path.ends_with(site));
            for (i, line) in text.lines().enumerate() {
                // Any lint attribute on it (allow, expect, warn) would open the door.
                if line.contains(concat!("unsafe", "_code")) && !unsafe_allowed {
                    problems.push(format!(
                        "{}:{}: unsafe code outside {UNSAFE_SITES:?}",
                        path.display(),
                        i + 1
                    ));
                }
                if line.contains(concat!("manual", "_seed(")) && !seed_allowed {
                    problems.push(format!(
                        "{}:{}: libtorch's generator seeded outside {SEED_SITES:?}: draw through \
                         fqvit_testkit::seeded, which holds it for one test at a time",
                        path.display(),
                        i + 1
                    ));
                }
                // Built with concat! so that this file does not contain the patterns it forbids.
                for bad in
                    [concat!("todo", "!("), concat!("dbg", "!("), concat!("unimplemented", "!(")]
                {
                    if line.contains(bad) {
                        problems.push(format!("{}:{}: {bad}", path.display(), i + 1));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Files of one crate that import each other in a circle (`use crate::…`, `super::…`; test
/// modules aside): ARCHITECTURE.md keeps each crate's files layered.
fn import_circles(src: &Path, problems: &mut Vec<String>) -> Result<()> {
    let mut files = Vec::new();
    collect_rs(src, &mut files)?;
    // Module path of each file: `a/b.rs` and `a/b/mod.rs` are `a::b`, `lib.rs` the root.
    let mut modules: Vec<(String, String)> = Vec::new();
    for path in files {
        let rel = path.strip_prefix(src)?.with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
            parts.pop();
        }
        let text = std::fs::read_to_string(&path)?;
        let text = text.split("#[cfg(test)]").next().unwrap_or_default().to_owned();
        modules.push((parts.join("::"), text));
    }
    let index = |name: &str| modules.iter().position(|(m, _)| m == name);
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); modules.len()];
    for (i, (module, text)) in modules.iter().enumerate() {
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        for (prefix, base) in [("crate::", String::new()), ("super::", parent.to_owned())] {
            for path in imported_paths(text, prefix) {
                // The longest prefix of the path that is a file of this crate.
                let segments: Vec<&str> = path.split("::").collect();
                let target = (1..=segments.len()).rev().find_map(|k| {
                    let name = segments[..k].join("::");
                    let full = if base.is_empty() { name } else { format!("{base}::{name}") };
                    index(&full)
                });
                let Some(j) = target else { continue };
                let other = &modules[j].0;
                let nested = other.is_empty()
                    || module.starts_with(&format!("{other}::"))
                    || other.starts_with(&format!("{module}::"));
                if j != i && !nested && !edges[i].contains(&j) {
                    edges[i].push(j);
                }
            }
        }
    }
    // A circle is an edge back to a file on the current path.
    let mut reported: Vec<Vec<usize>> = Vec::new();
    fn walk(
        at: usize,
        path: &mut Vec<usize>,
        edges: &[Vec<usize>],
        reported: &mut Vec<Vec<usize>>,
    ) {
        for &next in &edges[at] {
            if let Some(start) = path.iter().position(|&p| p == next) {
                let mut circle = path[start..].to_vec();
                circle.sort_unstable();
                if !reported.contains(&circle) {
                    reported.push(circle);
                }
            } else if path.len() < 8 {
                path.push(next);
                walk(next, path, edges, reported);
                path.pop();
            }
        }
    }
    for start in 0..modules.len() {
        walk(start, &mut vec![start], &edges, &mut reported);
    }
    for circle in reported {
        let names: Vec<&str> = circle.iter().map(|&i| modules[i].0.as_str()).collect();
        problems.push(format!("{}: files import each other in a circle: {names:?}", src.display()));
    }
    Ok(())
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The module paths after each `prefix` (`crate::` or `super::`), one per item of a brace group
/// (`crate::{a, b::c}` gives `a` and `b::c`; a path keeps its lowercase segments only).
fn imported_paths(text: &str, prefix: &str) -> Vec<String> {
    let module_path = |s: &str| -> String {
        s.split("::")
            .map(str::trim)
            .take_while(|seg| {
                seg.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            })
            .take_while(|seg| seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .collect::<Vec<_>>()
            .join("::")
    };
    let mut out = Vec::new();
    for (at, _) in text.match_indices(prefix) {
        let rest = &text[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level items, up to its closing brace.
            let (mut depth, mut item) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => out.push(module_path(&std::mem::take(&mut item))),
                    _ if depth == 0 => item.push(c),
                    _ => {}
                }
            }
            out.push(module_path(&item));
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            out.push(module_path(&rest[..end.unwrap_or(rest.len())]));
        }
    }
    out.retain(|p| !p.is_empty());
    out
}
