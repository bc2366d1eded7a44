//! CPU float32 tensors seen as slices, for the fused passes of `fqvit_ops::float`: the only
//! unsafe code of this crate.
//!
//! tch offers no safe slice view of a tensor's storage, and copying in and out would cost more
//! memory traffic than the libtorch operations the fused passes replace.
#![allow(unsafe_code)]

use tch::{Device, Kind, Tensor};

/// The elements of `t` when it is a contiguous float32 CPU tensor.
///
/// Callers run no libtorch operation that writes `t` while the slice lives.
pub(crate) fn slice(t: &Tensor) -> Option<&[f32]> {
    if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        return Some(&[]);
    }
    // SAFETY: the data pointer of a contiguous float32 CPU tensor (storage offset applied)
    // addresses `numel` initialised, aligned f32 values in storage that `t` keeps alive for the
    // borrow; nothing writes them meanwhile (the contract above).
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) })
}

/// A new contiguous float32 CPU tensor that no other handle shares, so that it can be written
/// as a slice.
pub(crate) struct Owned(Tensor);

impl Owned {
    /// Zeros of `size` (initialised, so the slice never exposes uninitialised memory).
    pub(crate) fn zeros(size: &[i64]) -> Self {
        Owned(Tensor::zeros(size, (Kind::Float, Device::Cpu)))
    }

    /// Its elements, writable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        let n = self.0.numel();
        if n == 0 {
            return &mut [];
        }
        // SAFETY: the tensor is a contiguous float32 CPU tensor made by `zeros`, whose storage
        // no other handle shares (`tensor` lends it only for read-only operations that do not
        // keep it), and `&mut self` makes this borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.data_ptr() as *mut f32, n) }
    }

    /// The tensor, for a read-only libtorch operation whose result does not alias it.
    pub(crate) fn tensor(&self) -> &Tensor {
        &self.0
    }

    /// The tensor, handed over.
    pub(crate) fn into_tensor(self) -> Tensor {
        self.0
    }
}
