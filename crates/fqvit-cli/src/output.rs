//! Output paths are checked before any long work starts, so a typo never costs a calibration.

use std::path::Path;

use anyhow::{Result, bail};

/// Fails unless a file can be written at `path`: its folder exists and takes a new file, and
/// `path` is not a folder. Leaves nothing behind (an existing file is not touched).
pub(crate) fn check_writable(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() {
        bail!("{flag} {}: is a folder, not a file", path.display());
    }
    if path.exists() {
        // An existing file must take writing (opened for appending: nothing changes).
        return match std::fs::OpenOptions::new().append(true).open(path) {
            Ok(_) => Ok(()),
            Err(e) => bail!("{flag} {}: cannot be written: {e}", path.display()),
        };
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("{flag} {}: the folder {} does not exist", path.display(), dir.display());
    }
    let probe = dir.join(format!(".fqvit-write-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            // Best effort: a leftover empty probe file is harmless.
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bail!("{flag} {}: cannot write in {}: {e}", path.display(), dir.display()),
    }
}
