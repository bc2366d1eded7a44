//! # fqvit-calib: data, calibration, evaluation and the qparams artifact
//!
//! The top library of the fqvit workspace: it reads ImageNet folders and preprocesses images
//! exactly as the original's Pillow/torchvision pipeline, runs models from `fqvit-models` in
//! calibrate mode feeding `fqvit-observers`, freezes the parameters, and evaluates.
//!
//! ```
//! use fqvit_calib::data::{class_index, shuffle};
//! // Labels are positions in the sorted list of the 1000 ImageNet-1k wnids.
//! assert_eq!(class_index("n01440764"), Some(0));
//! assert_eq!(class_index("n15075141"), Some(999));
//! assert_eq!(class_index("n99999999"), None);
//! // The calibration shuffle is a documented, seeded Fisher–Yates.
//! let mut xs = [0, 1, 2, 3, 4];
//! shuffle(&mut xs, 0);
//! let mut sorted = xs;
//! sorted.sort();
//! assert_eq!(sorted, [0, 1, 2, 3, 4]);
//! ```

pub mod agreement;
pub mod artifact;
pub mod calibrate;
pub mod data;
pub mod decode;
mod error;
pub mod eval;
pub mod experiment;
pub mod gptq;
pub mod reparam;
pub mod resize;

pub use calibrate::{Calibrator, calibrate, calibration_set, train_split};
pub use error::{Error, Result};
pub use experiment::Experiment;
