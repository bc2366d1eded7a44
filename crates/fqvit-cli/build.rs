//! Links the CLI so that its binary finds libtorch without LD_LIBRARY_PATH.
//!
//! `.cargo/config.toml` sets LIBTORCH to the `.fqvit/libtorch` link that `cargo xtask setup`
//! makes (or the user's own); its `lib/` goes into the binary's runpath. CUDA is linked with
//! `--no-as-needed`, otherwise nothing references libtorch_cuda and the linker drops it.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let lib = Path::new(&libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
