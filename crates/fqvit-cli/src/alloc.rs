//! The process's allocator setting: freed tensors stay in the heap.
//!
//! glibc serves every block above its mmap threshold (128 KiB, raised by itself to at most
//! 32 MiB) with a fresh `mmap` and unmaps it on free, so each large tensor of a batch (the
//! attention scores of ViT-Tiny at batch 100 are 46 MB) arrives as new pages that the kernel must
//! fault in and zero.
//! libtorch allocates through the same `malloc`. On the quantized ViT-Tiny evaluation, about 40 %
//! of the time went to page faults, and raising the threshold doubles its speed
//! (docs/speed.md has the figures).
//! The price: memory freed during the run is reused by later tensors instead of going back to
//! the kernel, so the resident size stays near the peak (which it reaches anyway).

/// Keeps blocks up to 1 GiB in the heap and the heap's top untrimmed.
///
/// Call it first in `main`, before any other thread exists (`--low-memory` skips it). Returns whether glibc accepted
/// both settings (always `true` where they do not apply).
#[allow(unsafe_code)]
pub(crate) fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const LIMIT: libc::c_int = 1 << 30;
        // SAFETY: mallopt only sets allocator parameters, takes no pointers, and is called
        // before any other thread exists (glibc's malloc locks its arenas in any case).
        let (mmap, trim) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT),
                libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT),
            )
        };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}
