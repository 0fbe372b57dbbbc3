//! Model file formats for BitNet b1.58: bytes in, typed tensors and metadata out.
//!
//! - [`gguf`]: our own GGUF v2/v3 reader (and a small writer used by tests and tools).
//! - [`safetensors_dir`]: Hugging Face model directories (`config.json` + safetensors shards).
//! - [`codecs`]: scalar decoders/encoders for the block types (I2_S, TQ1_0, TQ2_0, Q8_0, Q6_K,
//!   F16, BF16). They are the reference; the engine repacks ternary weights from them.
//!
//! Nothing here knows about transformers or kernels.

pub mod codecs;
pub mod error;
pub mod fuzz_harness;
pub mod gguf;
pub mod safetensors_dir;

pub use error::FormatError;
pub use gguf::{GgmlType, GgufFile, MetaValue, TensorInfo};
