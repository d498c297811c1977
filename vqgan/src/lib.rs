//! ViT-VQGAN (Yu et al. 2021, as Parti used it): a ViT encoder over 8x8 patches, a factorised
//! l2-normalised codebook, and a ViT decoder back to pixels.
//!
//! Done so far: the model ([`model`]) and the codebook lookup ([`quantize`]). Training, decoder
//! fine-tuning, shard encoding and the `vqgan` binary are the next steps of the vqgan issue.

pub mod model;
pub mod quantize;

pub use model::{VitVqgan, VitVqganConfig};
pub use quantize::{Quantized, Quantizer, QuantizerConfig};
