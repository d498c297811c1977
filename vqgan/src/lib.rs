//! The ViT-VQGAN image tokenizer stages (the model itself is `models::vqgan`).
//!
//! - [`config`]: what `vqgan train` and `vqgan finetune-decoder` compute, with named presets;
//!   [`train`]: both stages on one training loop (stage 1 on an `ingest pairs` manifest, stage
//!   2 on stage 1's frozen encoder and codebook), each step's gradients and critic update in
//!   `step`; [`loss`]: pixel, perceptual and adversarial terms (with the discriminator).
//! - [`eval`]: PSNR/SSIM/usage and the reconstruction grid.
//! - [`encode`]: pairs shards -> token shards, `vqgan reconstruct` and `vqgan decode`.
//! - [`superres`]: `vqgan superres`, Parti's super-resolution model trained to enlarge the
//!   tokenizer's pictures.

pub mod bench;
pub mod config;
pub mod encode;
pub mod eval;
pub mod loss;
mod step;
pub mod superres;
pub mod train;

use manifests::Tool;

pub use nn::Error;

pub fn tool() -> Tool {
    Tool {
        name: "vqgan".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}
