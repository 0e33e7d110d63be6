//! turnrl-core: the pure Rust core of turnrl.
//!
//! Nothing here knows about Python; the `turnrl-python` crate converts types
//! and releases the GIL around these functions.

pub mod advantages;
pub mod buffer;
pub mod error;

pub use error::{Error, Result};
