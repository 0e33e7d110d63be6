//! turnrl-core: the pure Rust core of turnrl.
//!
//! Nothing here knows about Python; the `turnrl-python` crate converts types
//! and releases the GIL around these functions.

pub mod advantages;
pub mod args;
pub mod buffer;
pub mod calibration;
pub mod error;
pub mod json;
pub mod parse;

pub use error::{Error, Result};
