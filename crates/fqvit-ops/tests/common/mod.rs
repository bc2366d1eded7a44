//! Test helpers: the shared data beside the repository.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;

pub use fqvit_testkit::shared_dir;

/// A tensor read from a golden safetensors file, as f32 or i32 values with its shape.
pub struct Golden {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
}

/// Reads every tensor of `golden/<name>` into f32 values (i32 tensors are converted exactly).
pub fn read_golden(name: &str) -> HashMap<String, Golden> {
    let path = shared_dir().join("golden").join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden file parses");
    st.tensors()
        .into_iter()
        .map(|(key, view)| {
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I32 => data
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                other => panic!("{key}: unexpected dtype {other:?}"),
            };
            (key, Golden { shape: view.shape().to_vec(), f32: values })
        })
        .collect()
}
