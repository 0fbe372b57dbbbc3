//! The BitNet b1.58 model family: configuration from file metadata, weights in their packed
//! runtime form, the forward pass, tokenizer, and sampling.

pub mod error;
pub mod sampler;
pub mod tokenizer;

pub use error::{Error, Result};
