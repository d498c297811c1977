//! ViT-VQGAN (Yu et al. 2021, as Parti used it): a ViT encoder over 8x8 patches, a factorised
//! l2-normalised codebook, and a ViT decoder back to pixels.
//!
//! - [`model`]: the network; [`quantize`]: the codebook lookup and dead-code restarts.
//! - [`train`]: `vqgan train`, stage 1 on an ingest pairs manifest ([`data`] loads it).
//!
//! Decoder fine-tuning, shard encoding, reconstruct/decode commands and exact resume are the
//! remaining steps of the vqgan issue.

pub mod data;
pub mod model;
pub mod quantize;
pub mod train;

use manifests::Tool;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] manifests::Error),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Usage(String),
}

pub fn tool() -> Tool {
    Tool {
        name: "vqgan".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

pub use model::{VitVqgan, VitVqganConfig};
pub use quantize::{Quantized, Quantizer, QuantizerConfig};
