//! What `vqgan train` and `vqgan finetune-decoder` compute: their configs and named presets
//! (the paper's ViT-VQGAN schedule, and the tiny pipeline's, with the measurements behind it).

use burn::optim::ModuleOptimizer;
use models::vqgan::{VitConfig, VitVqganConfig};
use nn::data::StreamConfig;
use nn::fused::Precision;
use nn::images::{ImageStream, Rejected};
use nn::training::{GradClip, Schedule};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::loss::LossConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model preset: tiny, small or base.
    pub model: String,
    /// Codebook entries instead of the model preset's (512 tiny, 8192 small and base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codebook_size: Option<usize>,
    /// Dimension of the factorised lookup space instead of the preset's (32, as in Parti).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_dim: Option<usize>,
    /// Residual 3x3 convolutions over the decoder's token grid instead of the preset's (none;
    /// see `VitConfig::local_convs`). A fine-tuned decoder keeps stage 1's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_local_convs: Option<usize>,
    pub steps: usize,
    pub batch_size: usize,
    /// Micro-batches each batch is split into: run one after another, or at once by several
    /// workers (`--workers`, one per core on flex's CPU), with their gradients summed in order.
    #[serde(default = "one")]
    pub accumulation: usize,
    /// Peak learning rate, reached after `warmup_steps`, then cosine decay to `final_learning_rate`.
    pub learning_rate: f64,
    pub final_learning_rate: f64,
    pub warmup_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    /// The L2 norm gradients are clipped to: each parameter's on its own, or all together
    /// (`grad_clip`).
    pub grad_clip_norm: f32,
    /// `per_tensor` (the default: Burn's clipping, what the presets were tuned with) or
    /// `global` (`torch.nn.utils.clip_grad_norm_`'s norm over all gradients). Written only
    /// when global, so configs from before this key keep their identity.
    #[serde(default, skip_serializing_if = "GradClip::is_per_tensor")]
    pub grad_clip: GradClip,
    pub loss: LossConfig,
    /// Check for dead codes every this many steps (0: never) ...
    pub restart_every: usize,
    /// ... a code is dead when no batch of the last `restart_window` steps chose it ...
    pub restart_window: usize,
    /// ... until this step, so the codebook settles before training ends.
    pub restart_until: usize,
    /// Save a checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub seed: u64,
    /// Rows held to shuffle across shard boundaries (shards and rows are shuffled anyway).
    pub shuffle_buffer: usize,
    /// `f32`, or `bf16`: the ViT-VQGAN's forward and backward passes under libtorch's bf16
    /// autocast (tch only), its outputs taken into the losses in f32; parameters, gradients,
    /// optimizer state and the discriminator's own step stay f32. Written only when bf16, so
    /// configs from before this key keep their identity.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

fn one() -> usize {
    1
}

/// Decoded batches the background reader keeps ready, in batches.
const PREFETCH_BATCHES: usize = 4;

/// Held-out images scored at the end (the first found, shard by shard).
pub(crate) const HELD_OUT_LIMIT: usize = 512;

impl TrainConfig {
    pub fn preset(name: &str) -> Result<TrainConfig, Error> {
        let paper = |model: &str| TrainConfig {
            model: model.into(),
            codebook_size: None,
            code_dim: None,
            decoder_local_convs: None,
            steps: 500_000,
            batch_size: 256,
            accumulation: 1,
            // ViT-VQGAN: Adam (0.9, 0.99), warm-up to 1e-4, cosine to 5e-5, weight decay 1e-4.
            learning_rate: 1e-4,
            final_learning_rate: 5e-5,
            warmup_steps: 5000,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 1e-4,
            grad_clip_norm: 1.0,
            grad_clip: GradClip::PerTensor,
            loss: LossConfig::paper(),
            restart_every: 100,
            restart_window: 1000,
            restart_until: 400_000,
            checkpoint_every: 5000,
            log_every: 100,
            seed: 0,
            shuffle_buffer: 10_000,
            precision: Precision::F32,
        };
        match name {
            "tiny" => Ok(TrainConfig {
                // Decoded patch by patch, 8x8 patches are bounded by what k-means over them
                // keeps (shapes read right on 1000 fresh pictures: 1024 codes 0.80, 2048 0.85,
                // 4096 0.92; docs/tiny-eval.md), and the plain ViT levels off near that bound
                // (1024 codes: 0.79, squares in corner cells 0.14). Two convolutions over the
                // decoder's token grid let a patch decode from its neighbours' codes: 1024
                // codes 0.85, 2048 0.87 (corner squares 0.67); through the whole chain, eval
                // 0.833 -> 0.875 with 2048. They cost the tokenizer ~35% more time.
                codebook_size: Some(2048),
                decoder_local_convs: Some(2),
                // Held-out PSNR / tokenizer ceiling (infer eval): 1500 steps 29.7 dB / 0.63,
                // 3000 31.2 / 0.74, 5000 31.9 / 0.79, 7000 31.8 / 0.78 (level: k-means over the
                // 8x8 patches with 512 codes reaches 33.9 dB / 0.79); 5000 take 10 minutes.
                steps: 5000,
                batch_size: 16,
                // Two halves of 8, so two cores each take one.
                accumulation: 2,
                // Measured over 1500 steps (held-out PSNR / tokenizer ceiling): 5e-4 29.0 dB /
                // 0.55, 1e-3 29.4 / 0.63, 2e-3 29.7 / 0.63, 3e-3 29.7 / 0.65; 4e-3 fell back
                // (25.5 dB at 750 steps against 28.3 for 2e-3).
                learning_rate: 2e-3,
                final_learning_rate: 2e-5,
                warmup_steps: 50,
                loss: LossConfig {
                    l1_weight: 1.0,
                    // Off: 64 px tiles of flat colour have little texture to model in logit space.
                    logit_laplace_weight: 0.0,
                    // Off: on 2 CPU cores even a 32-channel critic costs ~30x the tiny
                    // tokenizer's step. `[loss] adversarial_weight = 0.1` turns it on.
                    adversarial_weight: 0.0,
                    adversarial_start: 750,
                    discriminator_channels: 32,
                    discriminator_max_channels: 128,
                    ..LossConfig::paper()
                },
                restart_every: 10,
                restart_window: 50,
                restart_until: 1200,
                checkpoint_every: 250,
                log_every: 50,
                shuffle_buffer: 512,
                ..paper("tiny")
            }),
            "small" | "base" => Ok(paper(name)),
            other => Err(Error::Usage(format!(
                "unknown preset '{other}' (tiny, small, base)"
            ))),
        }
    }

    /// The model this config trains; an error for a config that cannot train (unknown model,
    /// codebook or code sizes out of range, batches that do not split into equal micro-batches,
    /// a clipping bound that is not positive).
    pub fn model_config(&self) -> Result<VitVqganConfig, Error> {
        nn::training::micro_batch_size(self.batch_size, self.accumulation)?;
        GradClip::check(self.grad_clip_norm)?;
        let mut config = match self.model.as_str() {
            "tiny" => VitVqganConfig::tiny(),
            "small" => VitVqganConfig::small(),
            "base" => VitVqganConfig::base(),
            other => {
                return Err(Error::Usage(format!(
                    "unknown model '{other}' (tiny, small, base)"
                )));
            }
        };
        if let Some(size) = self.codebook_size {
            if !(2..=usize::from(u16::MAX) + 1).contains(&size) {
                return Err(Error::Usage(format!(
                    "codebook_size {size}: tokens are stored as u16, so 2..=65536"
                )));
            }
            config.quantizer.codebook_size = size;
        }
        if let Some(dim) = self.code_dim {
            if !(1..=config.encoder.d_model).contains(&dim) {
                return Err(Error::Usage(format!(
                    "code_dim {dim}: the lookup space is a projection of the encoder's \
                     {} channels, so 1..={}",
                    config.encoder.d_model, config.encoder.d_model
                )));
            }
            config.quantizer.code_dim = dim;
        }
        if let Some(convs) = self.decoder_local_convs {
            config.decoder.local_convs = convs;
        }
        Ok(config)
    }

    pub fn schedule(&self) -> Schedule {
        Schedule::cosine(
            self.learning_rate,
            self.final_learning_rate,
            self.warmup_steps,
        )
    }

    /// Linear warm-up, then cosine decay to the final rate.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        self.schedule().at(step, self.steps)
    }

    pub(crate) fn optimizer(&self) -> ModuleOptimizer {
        nn::fused::AdamW {
            beta_1: self.beta1 as f32,
            beta_2: self.beta2 as f32,
            weight_decay: self.weight_decay as f32,
            grad_clip_norm: self.grad_clip.per_tensor(self.grad_clip_norm),
            ..Default::default()
        }
        .init()
    }

    /// The training images, from row `position` of the seeded order on.
    pub(crate) fn image_stream(
        &self,
        upstream: &manifests::Upstream,
        size: usize,
        position: u64,
        rejected: Rejected,
    ) -> Result<ImageStream, Error> {
        let config = StreamConfig {
            seed: self.seed,
            shuffle_buffer: self.shuffle_buffer,
            prefetch: PREFETCH_BATCHES * self.batch_size,
        };
        ImageStream::open(upstream, size, config, position, rejected)
    }
}

/// Parti's stage 2: which larger decoder to train on the frozen stage-1 encoder and codebook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Decoder preset: tiny-large (CI size), small, base or large (Parti's 32 blocks, 1280).
    pub decoder: String,
    /// Keep the final sigmoid (false: raw [0, 1] RGB, Parti's fix for pixelation).
    pub output_sigmoid: bool,
    /// Start from the stage-1 decoder (its blocks copied, the extra ones appended as
    /// identities) instead of from scratch; needs a decoder of stage 1's width and its output.
    #[serde(default)]
    pub warm_start: bool,
    pub train: TrainConfig,
}

impl FinetuneConfig {
    pub fn preset(name: &str) -> Result<FinetuneConfig, Error> {
        let mut train = TrainConfig::preset(name)?;
        train.restart_every = 0;
        // Parti's fine-tuned decoder outputs raw RGB: no sigmoid, so no logit-Laplace term.
        train.loss.logit_laplace_weight = 0.0;
        if name == "tiny" {
            // Trained from scratch, a new decoder was still 1.6 dB behind stage 1 after 1000
            // steps; started from stage 1's (keeping its sigmoid, which the copied layers were
            // trained through) it begins level and only has to improve. With the neighbour
            // convolutions, `infer eval` averaged over seeds 0-3 (same Parti): 500 steps 0.869,
            // 1000 0.888, 2000 0.889 (4000, seed 0 only: 0.889).
            train.steps = 1000;
            // Stage 1's 2e-3 (the preset's), not a gentler rate for a warm start: at 5e-4 the
            // decoder was still under-trained. Held-out PSNR 35.09 -> 35.27 dB, tokenizer
            // ceiling 0.848 -> 0.896, `infer eval` mean over sampling seeds 0-9 (same Parti,
            // guidance 1.2) 0.885 -> 0.896; 3e-3 0.896, 4e-3 0.889 (seeds 0-3). 1500 steps at
            // 2e-3 read 0.876 (seeds 0-3) despite 35.39 dB.
            return Ok(FinetuneConfig {
                decoder: "tiny-large".into(),
                output_sigmoid: true,
                warm_start: true,
                train,
            });
        }
        Ok(FinetuneConfig {
            decoder: "large".into(),
            output_sigmoid: false,
            warm_start: false,
            train,
        })
    }

    pub fn decoder_config(&self) -> Result<VitConfig, Error> {
        match self.decoder.as_str() {
            "tiny-large" => Ok(VitConfig::tiny_large()),
            "small" => Ok(VitConfig::small()),
            "base" => Ok(VitConfig::base()),
            "large" => Ok(VitConfig::large()),
            other => Err(Error::Usage(format!(
                "unknown decoder '{other}' (tiny-large, small, base, large)"
            ))),
        }
    }
}
