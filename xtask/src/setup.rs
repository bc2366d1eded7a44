//! libtorch and cmake set-up: install into a per-user cache, link into `.fqvit/`.
//!
//! Layout (see ARCHITECTURE.md, "libtorch"):
//! - `<cache>/torch-2.11.0/` is a `pip install --target` of `torch==2.11.0` (CUDA build, with its
//!   `nvidia-*` dependencies beside it, which `torch/lib/*.so` find through their own rpaths);
//! - `<repo>/.fqvit/libtorch` links to `<cache>/torch-2.11.0/torch` (or the user's own libtorch),
//!   and `.cargo/config.toml` points `LIBTORCH` and `LD_LIBRARY_PATH` there;
//! - `<repo>/.fqvit/cmake` links to a cmake binary (needed to build libjpeg-turbo).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{project_root, run};

/// The PyTorch release that `tch = "=0.24.0"` is built against.
pub(crate) const TORCH_VERSION: &str = "2.11.0";

/// Where libtorch came from.
pub(crate) struct Libtorch {
    pub(crate) dir: PathBuf,
    pub(crate) version: String,
    pub(crate) origin: &'static str,
}

/// `$FQVIT_CACHE_DIR`, else `$XDG_CACHE_HOME/fqvit`, else `~/.cache/fqvit`.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FQVIT_CACHE_DIR") {
        return Ok(dir.into());
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(Path::new(&dir).join("fqvit"));
    }
    let home = std::env::var_os("HOME")
        .context("neither FQVIT_CACHE_DIR, XDG_CACHE_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cache").join("fqvit"))
}

fn link_dir() -> PathBuf {
    project_root().join(".fqvit")
}

/// An environment variable set by the user, not the one `.cargo/config.toml` injects.
fn user_env(name: &str, ours: &Path) -> Option<PathBuf> {
    let value = PathBuf::from(std::env::var_os(name)?);
    (value != ours).then_some(value)
}

pub(crate) fn setup() -> Result<Libtorch> {
    let links = link_dir();
    std::fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
    let libtorch = resolve_libtorch(true)?;
    relink(&links.join("libtorch"), &libtorch.dir)?;
    let cmake = resolve_cmake()?;
    relink(&links.join("cmake"), &cmake)?;
    eprintln!(
        "libtorch {} ({}) at {}\ncmake at {}",
        libtorch.version,
        libtorch.origin,
        libtorch.dir.display(),
        cmake.display()
    );
    Ok(libtorch)
}

pub(crate) fn doctor() -> Result<()> {
    let libtorch = resolve_libtorch(false)?;
    println!("libtorch:  {}", libtorch.dir.display());
    println!(
        "version:   {} ({}; tch 0.24.0 expects {TORCH_VERSION})",
        libtorch.version, libtorch.origin
    );
    let cuda_build = libtorch.dir.join("lib/libtorch_cuda.so").exists();
    println!("build:     {}", if cuda_build { "CUDA" } else { "CPU only" });
    let linked = std::fs::read_link(link_dir().join("libtorch")).ok();
    println!(
        "linked:    {}",
        linked.map_or("no (run `cargo xtask setup`)".to_owned(), |p| p.display().to_string())
    );
    match resolve_cmake() {
        Ok(cmake) => println!("cmake:     {}", cmake.display()),
        Err(err) => println!("cmake:     missing ({err:#})"),
    }
    // What libtorch itself sees (CUDA devices) needs tch, which only the CLI links.
    run(crate::cargo().args(["run", "--quiet", "--release", "-p", "fqvit-cli", "--", "doctor"]))
}

fn resolve_libtorch(install: bool) -> Result<Libtorch> {
    let ours = link_dir().join("libtorch");
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let out = Command::new("python3")
            .args(["-c", "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__)"])
            .output()
            .context("LIBTORCH_USE_PYTORCH is set but python3 could not be run")?;
        if !out.status.success() {
            bail!(
                "LIBTORCH_USE_PYTORCH is set but `import torch` failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let dir = PathBuf::from(lines.next().unwrap_or_default());
        let version = lines.next().unwrap_or_default().to_owned();
        check_version(&version, &dir)?;
        return Ok(Libtorch { dir, version, origin: "LIBTORCH_USE_PYTORCH" });
    }
    if let Some(dir) = user_env("LIBTORCH", &ours) {
        let version = read_version(&dir)?;
        check_version(&version, &dir)?;
        return Ok(Libtorch { dir, version, origin: "LIBTORCH" });
    }
    let target = cache_dir()?.join(format!("torch-{TORCH_VERSION}"));
    let dir = target.join("torch");
    if !dir.join("lib/libtorch.so").exists() {
        if !install {
            bail!("no libtorch at {}: run `cargo xtask setup`", dir.display());
        }
        pip_install(&target, &format!("torch=={TORCH_VERSION}"))?;
    }
    let version = read_version(&dir)?;
    check_version(&version, &dir)?;
    Ok(Libtorch { dir, version, origin: "fqvit cache" })
}

/// `pip install --target`, into a `.partial` folder renamed on success, so an interrupted
/// download never looks installed.
fn pip_install(target: &Path, requirement: &str) -> Result<()> {
    let partial = target.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    eprintln!(
        "installing {requirement} into {} (the CUDA wheel of torch is about 4.7 GB)",
        target.display()
    );
    run(Command::new("python3").args(["-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--target"]).arg(&partial).arg(requirement))
        .with_context(|| format!("pip could not install {requirement}; install Python 3 with pip, or set LIBTORCH to a libtorch {TORCH_VERSION}"))?;
    if target.exists() {
        std::fs::remove_dir_all(target)
            .with_context(|| format!("removing {}", target.display()))?;
    }
    std::fs::rename(&partial, target)
        .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))
}

/// Reads `build-version` (libtorch zip) or `version.py` (PyPI wheel).
fn read_version(dir: &Path) -> Result<String> {
    let build_version = dir.join("build-version");
    if let Ok(text) = std::fs::read_to_string(&build_version) {
        return Ok(text.trim().to_owned());
    }
    let version_py = dir.join("version.py");
    let text = std::fs::read_to_string(&version_py).with_context(|| {
        format!("{} is not a libtorch: it has neither build-version nor version.py", dir.display())
    })?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_owned())
        })
        .with_context(|| format!("no __version__ in {}", version_py.display()))
}

fn check_version(version: &str, dir: &Path) -> Result<()> {
    let base = version.split('+').next().unwrap_or(version);
    if base != TORCH_VERSION {
        bail!(
            "libtorch at {} is version {version}, but tch 0.24.0 needs {TORCH_VERSION}: unset LIBTORCH / LIBTORCH_USE_PYTORCH to let `cargo xtask setup` install it",
            dir.display()
        );
    }
    Ok(())
}

fn resolve_cmake() -> Result<PathBuf> {
    let ours = link_dir().join("cmake");
    if let Some(cmake) = user_env("CMAKE", &ours) {
        return Ok(cmake);
    }
    if let Some(path) = find_on_path("cmake") {
        return Ok(path);
    }
    let target = cache_dir()?.join("cmake-tool");
    let bin = target.join("cmake/data/bin/cmake");
    if !bin.exists() {
        pip_install(&target, "cmake>=3.16")?;
    }
    Ok(bin)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn relink(link: &Path, to: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(to, link)
        .with_context(|| format!("linking {} to {}", link.display(), to.display()))
}
