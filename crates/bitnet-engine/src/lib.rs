//! The BitNet b1.58 model family: configuration from file metadata, weights in their packed
//! runtime form, the forward pass, tokenizer, and sampling.
//!
//! - [`config`]: hyper-parameters and family switches, from GGUF metadata or `config.json`.
//! - [`weights`]: every file format turned into the runtime weight layout.
//! - [`model`]: the forward pass and the KV cache (one readable function).
//! - [`tokenizer`], [`sampler`], [`generate`]: text in, tokens out, text back.
//! - [`synth`]: synthetic models of real shapes, for benchmarks and tests (`bitnet synth`).

mod bpe;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod sampler;
pub mod scheduler;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use config::Config;
pub use error::{Error, Result};
pub use model::{BatchItem, Model, Session, Workspace};
