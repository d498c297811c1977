//! ViT-VQGAN (Yu et al. 2021, as Parti used it): a ViT encoder over 8x8 patches, a factorised
//! l2-normalised codebook, and a ViT decoder back to pixels.
//!
//! - [`model`]: the network; [`quantize`]: the codebook lookup, usage and dead-code restarts;
//!   [`loss`]: pixel, perceptual and adversarial terms (with the discriminator).
//! - [`train`]: `vqgan train` (stage 1 on an ingest pairs manifest, [`data`] loads it) and
//!   `vqgan finetune-decoder` (stage 2); [`eval`]: PSNR/SSIM/usage and the reconstruction grid.
//! - [`encode`]: pairs shards -> token shards, `vqgan reconstruct` and `vqgan decode`.

pub mod bench;
pub mod data;
pub mod encode;
pub mod eval;
pub mod loss;
pub mod model;
pub mod quantize;
pub mod train;

use burn::tensor::Device;

use manifests::Tool;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] manifests::Error),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Usage(String),
    #[error(
        "stopped after step {step} as asked (--stop-after); the same command resumes from its checkpoint"
    )]
    Paused { step: usize },
}

pub fn tool() -> Tool {
    Tool {
        name: "vqgan".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// The config and weights a `vqgan train` or `vqgan finetune-decoder` manifest publishes, each
/// digest-checked, as a model on `device`.
pub fn load_vqgan(
    stage: &manifests::Upstream,
    device: &Device,
) -> Result<(VitVqganConfig, VitVqgan), Error> {
    let uri = stage.location.uri();
    let artifact = |kind: &'static str| {
        stage
            .artifacts_of_kind(kind)
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::Data(format!(
                    "{uri}: no '{kind}' artifact (is this a vqgan manifest? it is '{}')",
                    stage.manifest.stage
                ))
            })
    };
    let config_bytes = stage.read_artifact(artifact("config")?)?;
    let config: VitVqganConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::Data(format!("{uri}: model.json: {e}")))?;
    let weights = stage.read_artifact(artifact("checkpoint")?)?;
    let mut model = config.init(device);
    nn::training::load_safetensors(&mut model, &weights, &format!("{uri}: model.safetensors"))
        .map_err(|e| Error::Data(e.to_string()))?;
    Ok((config, model))
}

pub use model::{VitVqgan, VitVqganConfig};
pub use quantize::{Quantized, Quantizer, QuantizerConfig};
