//! parti's models, written once for any Burn backend (the backend is chosen in `nn::backend`),
//! in candle's style: a config with named presets, `init(&device)`, an explicit `forward`.
//!
//! - [`vqgan`]: the ViT-VQGAN image tokenizer; its codebook lookup is [`vqgan::quantize`].
//! - [`tokenizer`]: the SentencePiece text tokenizer as the models use it (training it is the
//!   `train tokenizer` stage's business).
//! - [`text_encoder`]: the BERT-style text encoder, its MLM head and the contrastive pair
//!   (image tower + projections) that reranks samples.
//! - [`parti`]: the encoder-decoder Transformer from caption to image tokens.
//! - [`superres`]: the WDSR super-resolution model that enlarges the tokenizer's pictures.
//! - [`sampling`]: the sampling settings a model recommends, recorded in its manifest.
//!
//! Each model loads from the manifest of the stage that trained it ([`load_vqgan`],
//! [`load_text_encoder`], [`load_parti`], [`load_superres`]); the artifact kinds those stages publish are the
//! constants here, so writer and reader cannot drift apart.

mod checks;
pub mod parti;
pub mod sampling;
pub mod superres;
pub mod text_encoder;
pub mod tokenizer;
pub mod vqgan;

use burn::store::ModuleSnapshot;
use burn::tensor::Device;
use manifests::Upstream;
use serde::de::DeserializeOwned;

pub use parti::{Parti, PartiConfig};
pub use sampling::{SamplingConfig, SamplingSettings};
pub use superres::{SuperResConfig, SuperResolution};
pub use text_encoder::{Contrastive, PretrainedConfigs, TextEncoder, TextEncoderConfig};
pub use tokenizer::TextTokenizer;
pub use vqgan::{VitVqgan, VitVqganConfig};

pub use nn::Error;

/// A model's config (JSON), in every model-publishing stage's manifest.
pub const CONFIG_KIND: &str = "config";
/// ViT-VQGAN weights (`vqgan train`, `vqgan finetune-decoder`).
pub const VQGAN_KIND: &str = "checkpoint";
/// The text encoder's weights (`train text-encoder`).
pub const TEXT_ENCODER_KIND: &str = "checkpoint/text-encoder";
/// The contrastive pair's weights (`train text-encoder`).
pub const CONTRASTIVE_KIND: &str = "checkpoint/contrastive";
/// Parti's weights (`train parti`).
pub const PARTI_KIND: &str = "checkpoint/parti";
/// The super-resolution model's weights (`vqgan superres`).
pub const SUPERRES_KIND: &str = "checkpoint/superres";

/// The config artifact of `stage`, parsed.
fn read_config<C: DeserializeOwned>(stage: &Upstream) -> Result<C, Error> {
    let bytes = stage.read_artifact_of_kind(CONFIG_KIND)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::Data(format!(
            "{}: the '{CONFIG_KIND}' artifact: {e}",
            stage.location.uri()
        ))
    })
}

/// Loads the safetensors artifact of `kind` into `module`, which must match it exactly.
fn load_weights<M: ModuleSnapshot>(
    module: &mut M,
    stage: &Upstream,
    kind: &str,
) -> Result<(), Error> {
    let bytes = stage.read_artifact_of_kind(kind)?;
    let name = format!("{}: '{kind}'", stage.location.uri());
    nn::training::load_safetensors(module, &bytes, &name).map_err(|e| Error::Data(e.to_string()))
}

/// The ViT-VQGAN a `vqgan train` or `vqgan finetune-decoder` manifest publishes, on `device`.
pub fn load_vqgan(stage: &Upstream, device: &Device) -> Result<(VitVqganConfig, VitVqgan), Error> {
    let config: VitVqganConfig = read_config(stage)?;
    checks::vqgan(stage, &config)?;
    checks::fits_weights(stage, VQGAN_KIND, config.num_params() as u64)?;
    let mut model = config.init(device);
    load_weights(&mut model, stage, VQGAN_KIND)?;
    Ok((config, model))
}

/// The text encoder and contrastive pair a `train text-encoder` manifest publishes.
pub fn load_text_encoder(
    stage: &Upstream,
    device: &Device,
) -> Result<(PretrainedConfigs, TextEncoder, Contrastive), Error> {
    let configs: PretrainedConfigs = read_config(stage)?;
    checks::text_encoder(stage, &configs.text_encoder, &configs.contrastive)?;
    checks::fits_weights(
        stage,
        TEXT_ENCODER_KIND,
        configs.text_encoder.num_params() as u64,
    )?;
    checks::fits_weights(
        stage,
        CONTRASTIVE_KIND,
        configs.contrastive.num_params() as u64,
    )?;
    let mut encoder = configs.text_encoder.init(device);
    load_weights(&mut encoder, stage, TEXT_ENCODER_KIND)?;
    let mut contrastive = configs.contrastive.init(device);
    load_weights(&mut contrastive, stage, CONTRASTIVE_KIND)?;
    Ok((configs, encoder, contrastive))
}

/// Loads only the text encoder of a `train text-encoder` manifest into `encoder` (Parti's
/// encoder starts from it).
pub fn load_text_encoder_weights(encoder: &mut TextEncoder, stage: &Upstream) -> Result<(), Error> {
    load_weights(encoder, stage, TEXT_ENCODER_KIND)
}

/// The model a `train parti` manifest publishes.
pub fn load_parti(stage: &Upstream, device: &Device) -> Result<(PartiConfig, Parti), Error> {
    let config: PartiConfig = read_config(stage)?;
    checks::parti(stage, &config)?;
    checks::fits_weights(stage, PARTI_KIND, config.num_params() as u64)?;
    let mut model = config.init(device);
    load_weights(&mut model, stage, PARTI_KIND)?;
    Ok((config, model))
}

/// The config of the super-resolution model a `vqgan superres` manifest publishes, checked
/// against its weights before anything is allocated.
pub fn superres_config(stage: &Upstream) -> Result<SuperResConfig, Error> {
    let config: SuperResConfig = read_config(stage)?;
    config.check()?;
    checks::fits_weights(stage, SUPERRES_KIND, config.parameter_count())?;
    Ok(config)
}

/// The super-resolution model a `vqgan superres` manifest publishes, built from its config as
/// [`superres_config`] read and checked it (so a caller can look at the config first).
pub fn load_superres(
    stage: &Upstream,
    config: &SuperResConfig,
    device: &Device,
) -> Result<SuperResolution, Error> {
    let mut model = config.init(device);
    load_weights(&mut model, stage, SUPERRES_KIND)?;
    Ok(model)
}
