//! `vqgan train` (stage 1 on an `ingest pairs` manifest) and `vqgan finetune-decoder` (Parti's
//! stage 2: encoder and codebook frozen, a larger decoder trained alone).
//!
//! Both: AdamW with warm-up and cosine decay, gradient clipping, the [`crate::loss`] objective
//! (pixel terms, VGG-16 perceptual term, adversarial term with its discriminator),
//! checkpoints every N steps in the run's work folder, and an exact resume of a killed run (same
//! command, same config: it continues from the last checkpoint and ends with the same weights
//! and losses as an uninterrupted run). Held-out PSNR and codebook usage, the weights
//! (safetensors), a reconstruction grid and the metrics log go into the manifest.

use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};
use bytes::Bytes;
use nn::training::{self, Schedule};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use crate::data::{self, ImageSet, ImageStream};
use crate::eval::{self, reconstruction_grid};
use crate::loss::{GeneratorLoss, LossConfig, Objective, Vgg16Features, WithCritic};
use crate::model::{VitConfig, VitVqgan, VitVqganConfig};
use crate::quantize::CodeUsage;
use crate::{Error, load_vqgan, tool};
use manifests::{Artifact, Manifest, ShardSpec, StageRun};
use nn::data::StreamConfig;

pub const STAGE: &str = "vqgan.train";
pub const FINETUNE_STAGE: &str = "vqgan.finetune_decoder";

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
    pub grad_clip_norm: f32,
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
}

fn one() -> usize {
    1
}

/// Decoded batches the background reader keeps ready, in batches.
const PREFETCH_BATCHES: usize = 4;

/// Held-out images scored at the end (the first found, shard by shard).
const HELD_OUT_LIMIT: usize = 512;

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
            loss: LossConfig::paper(),
            restart_every: 100,
            restart_window: 1000,
            restart_until: 400_000,
            checkpoint_every: 5000,
            log_every: 100,
            seed: 0,
            shuffle_buffer: 10_000,
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

    pub fn model_config(&self) -> Result<VitVqganConfig, Error> {
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

    fn optimizer(&self) -> ModuleOptimizer {
        AdamWConfig::new()
            .with_beta_1(self.beta1 as f32)
            .with_beta_2(self.beta2 as f32)
            .with_weight_decay(self.weight_decay as f32)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(self.grad_clip_norm)))
            .init()
    }

    /// The training images, from row `position` of the seeded order on.
    fn image_stream(
        &self,
        upstream: &manifests::Upstream,
        size: usize,
        position: u64,
    ) -> Result<ImageStream, Error> {
        let config = StreamConfig {
            seed: self.seed,
            shuffle_buffer: self.shuffle_buffer,
            prefetch: PREFETCH_BATCHES * self.batch_size,
        };
        ImageStream::open(upstream, size, config, position)
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

pub fn psnr_db(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-10)).log10()
}

pub struct TrainOptions {
    pub out: String,
    pub device: String,
    /// Workers per device sharing each step's micro-batches (`None`: one per core on flex's
    /// CPU, else one); speed only, the result is the same.
    pub workers: Option<usize>,
    pub force: bool,
    /// Stop (with a checkpoint) once this many steps are done, as a time-limited batch job
    /// would be stopped; the same command later resumes. `None`: run to the end.
    pub stop_after: Option<usize>,
    /// torchvision VGG-16 weights as safetensors (local path or bucket URI), for the
    /// perceptual term; without them the term is off and the run says so.
    pub vgg16: Option<String>,
}

/// What a checkpoint holds besides the model and optimizer records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    /// Steps done.
    step: usize,
    /// Rows of the data order consumed by those steps.
    data_position: u64,
    usage: CodeUsage,
    log: String,
}

fn log_line(progress: &mut Progress, line: Value) {
    info!("{line}");
    progress.log.push_str(&format!("{line}\n"));
}

/// Checkpoint on schedule; `Err(Paused)` when `stop_after` says this process stops here.
fn after_step<M: Module>(
    run: &StageRun,
    config: &TrainConfig,
    options: &TrainOptions,
    model: &M,
    optimizer: &ModuleOptimizer,
    progress: &Progress,
) -> Result<(), Error> {
    let checkpointing = training::Checkpointing {
        every: config.checkpoint_every,
        total_steps: config.steps,
        stop_after: options.stop_after,
    };
    if checkpointing
        .after_step(run, progress.step, model, optimizer, progress)
        .map_err(|e| Error::Data(e.to_string()))?
    {
        return Err(Error::Paused {
            step: progress.step,
        });
    }
    Ok(())
}

fn weights_bytes(model: &VitVqgan) -> Result<Bytes, Error> {
    let weights = training::save_safetensors(model).map_err(|e| Error::Data(e.to_string()))?;
    Ok(Bytes::from(weights))
}

/// Weights, config, reconstruction grid and log, then the manifest with held-out metrics.
#[allow(clippy::too_many_arguments)]
fn publish(
    run: &StageRun,
    model: &VitVqgan,
    model_config: &VitVqganConfig,
    held_out: &ImageSet,
    rows_streamed: u64,
    log: String,
    mut metrics: Map<String, Value>,
    device: &Device,
    started: Instant,
) -> Result<Manifest, Error> {
    let quality = eval::evaluate(model, held_out, device)?;
    info!(
        "held-out PSNR {:.2} dB, SSIM {:.3}, codebook usage {:.3}",
        quality.psnr_db, quality.ssim, quality.codebook_usage
    );
    let config_json = serde_json::to_vec_pretty(model_config)
        .map_err(|e| Error::Data(format!("model config: {e}")))?;
    let artifacts: Vec<Artifact> = vec![
        run.write_artifact(
            "model.safetensors",
            "checkpoint",
            weights_bytes(model)?,
            None,
        )?,
        run.write_artifact("model.json", "config", Bytes::from(config_json), None)?,
        run.write_artifact(
            "reconstructions.png",
            "image/png",
            Bytes::from(reconstruction_grid(model, held_out, device)?),
            None,
        )?,
        run.write_artifact("metrics.jsonl", "metrics/jsonl", Bytes::from(log), None)?,
    ];
    metrics.insert("psnr_db".into(), json!(quality.psnr_db));
    metrics.insert("ssim".into(), json!(quality.ssim));
    metrics.insert("held_out_mse".into(), json!(quality.mse));
    metrics.insert("codebook_usage".into(), json!(quality.codebook_usage));
    metrics.insert("codebook_perplexity".into(), json!(quality.perplexity));
    metrics.insert("rows_streamed".into(), json!(rows_streamed));
    metrics.insert("held_out_images".into(), json!(held_out.len()));
    metrics.insert("parameters".into(), json!(model.num_params()));
    metrics.insert("backend".into(), json!(nn::backend::backend_name()));
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    Ok(run.publish(artifacts, metrics)?)
}

/// The held-out images of a pairs manifest, at the model's size.
fn held_out_images(upstream: &manifests::Upstream, size: usize) -> Result<ImageSet, Error> {
    let (held_out, stand_in) = data::held_out(upstream, size, HELD_OUT_LIMIT)?;
    if held_out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no images to train on",
            upstream.location.uri()
        )));
    }
    if stand_in {
        warn!("the data holds no image out: scoring on training images");
    }
    info!(
        "{} held-out images, {} backend",
        held_out.len(),
        nn::backend::backend_name()
    );
    Ok(held_out)
}

/// The VGG-16 file, read and recorded as an input (another file reruns the stage), when the
/// perceptual term is on; `status` says what the run did about the term, for its manifest.
fn perceptual_input(
    run: &mut StageRun,
    loss: &LossConfig,
    vgg16: Option<&str>,
) -> Result<(Option<(String, Bytes)>, String), Error> {
    match (vgg16, loss.perceptual_weight > 0.0) {
        (Some(uri), true) => {
            let bytes = manifests::Location::parse(uri)?.get()?;
            run.source_input("vgg16", uri, manifests::digest_bytes(&bytes));
            Ok((Some((uri.to_string(), bytes)), "on".into()))
        }
        (None, true) => {
            warn!(
                "perceptual loss off: no --vgg16 file (torchvision VGG-16 weights as safetensors) was given"
            );
            Ok((None, "off: no --vgg16 file".into()))
        }
        (Some(uri), false) => {
            warn!("{uri} not used: loss.perceptual_weight is 0");
            Ok((None, "off: weight 0".into()))
        }
        (None, false) => Ok((None, "off: weight 0".into())),
    }
}

/// The objective on each worker's device (VGG-16, when on, is loaded onto each).
fn objectives(
    loss: &LossConfig,
    vgg16: Option<(String, Bytes)>,
    workers: &[Device],
) -> Result<Vec<Objective>, Error> {
    workers
        .iter()
        .map(|device| objective(loss, vgg16.clone(), device))
        .collect()
}

fn objective(
    loss: &LossConfig,
    vgg16: Option<(String, Bytes)>,
    device: &Device,
) -> Result<Objective, Error> {
    let perceptual = match vgg16 {
        Some((uri, bytes)) => {
            let vgg = Vgg16Features::from_safetensors(&bytes, &uri, device)?;
            info!(
                "perceptual loss on: VGG-16 from {uri}{}",
                if vgg.has_lpips_weights() {
                    " with LPIPS channel weights"
                } else {
                    ""
                }
            );
            Some(vgg)
        }
        None => None,
    };
    Ok(Objective {
        config: loss.clone(),
        perceptual,
    })
}

/// The workers of `options` for the config's micro-batches.
fn workers(config: &TrainConfig, options: &TrainOptions) -> Result<Vec<Device>, Error> {
    nn::backend::training_workers(&options.device, options.workers, config.accumulation.max(1))
        .map_err(|e| Error::Usage(e.to_string()))
}

/// The trained module with its discriminator (when the adversarial term is on), the optimizer
/// and the loop's progress: from the run's last checkpoint, or fresh.
fn resume<M>(
    run: &StageRun,
    config: &TrainConfig,
    model: M,
    model_config: &VitVqganConfig,
    device: &Device,
) -> Result<(WithCritic<M>, ModuleOptimizer, Progress), Error>
where
    WithCritic<M>: Module,
{
    let fresh = Progress {
        step: 0,
        data_position: 0,
        usage: CodeUsage::new(model_config.quantizer.codebook_size),
        log: String::new(),
    };
    let trainee = WithCritic {
        model,
        critic: config
            .loss
            .discriminator(model_config.image_size)
            .map(|d| d.init(device)),
    };
    training::resume(run, trainee, config.optimizer(), fresh)
        .map_err(|e| Error::Data(e.to_string()))
}

/// The step's discriminator update on real images and the generator's (detached) output, when
/// the adversarial term counts; returns its loss for the log.
fn critic_step<M>(
    objective: &Objective,
    optimizer: &mut ModuleOptimizer,
    trainee: WithCritic<M>,
    real: Tensor<4>,
    fake: Tensor<4>,
    learning_rate: f64,
    step: usize,
) -> (WithCritic<M>, Option<f32>)
where
    WithCritic<M>: Module,
{
    let Some(critic) = trainee.critic_at(&objective.config, step) else {
        return (trainee, None);
    };
    let loss = objective.discriminator(critic, real, fake);
    let grads = GradientsParams::from_grads(loss.backward(), critic);
    let trainee = optimizer.step(learning_rate, trainee, grads);
    (trainee, Some(loss.into_scalar::<f32>()))
}

/// A step's loss as numbers, for its metrics line.
#[derive(Debug, Clone, Default)]
struct LossNumbers {
    total: f64,
    mse: f64,
    /// The codebook terms (stage 1).
    codebook: Option<f64>,
    terms: Vec<(&'static str, f64)>,
}

impl LossNumbers {
    fn of(loss: &GeneratorLoss, codebook: Option<&Tensor<1>>) -> LossNumbers {
        LossNumbers {
            total: loss.total.clone().into_scalar::<f32>() as f64,
            mse: loss.mse.clone().into_scalar::<f32>() as f64,
            codebook: codebook.map(|c| c.clone().into_scalar::<f32>() as f64),
            terms: loss.numbers(),
        }
    }

    /// The mean over a step's micro-batches (of equal size but perhaps the last).
    fn mean(parts: &[&LossNumbers]) -> LossNumbers {
        let n = parts.len().max(1) as f64;
        let mean =
            |value: &dyn Fn(&LossNumbers) -> f64| parts.iter().map(|p| value(p)).sum::<f64>() / n;
        let first = parts.first().map(|p| (*p).clone()).unwrap_or_default();
        LossNumbers {
            total: mean(&|p| p.total),
            mse: mean(&|p| p.mse),
            codebook: first.codebook.map(|_| mean(&|p| p.codebook.unwrap_or(0.0))),
            terms: first
                .terms
                .iter()
                .enumerate()
                .map(|(i, (name, _))| (*name, mean(&|p| p.terms.get(i).map_or(0.0, |t| t.1))))
                .collect(),
        }
    }
}

/// One metrics line: step, rate, every loss term, and what the caller adds.
fn step_line(
    step: usize,
    learning_rate: f64,
    loss: &LossNumbers,
    critic_loss: Option<f32>,
    extra: Value,
) -> Value {
    let mut line = json!({"step": step, "learning_rate": learning_rate,
        "loss": loss.total, "mse": loss.mse, "psnr_db": psnr_db(loss.mse)});
    if let (Value::Object(map), Value::Object(extra)) = (&mut line, extra) {
        map.extend(
            loss.terms
                .iter()
                .map(|(name, value)| ((*name).to_string(), json!(value))),
        );
        if let Some(codebook) = loss.codebook {
            map.insert("vq_loss".into(), json!(codebook));
        }
        map.extend(extra);
        if let Some(d) = critic_loss {
            map.insert("discriminator".into(), json!(d));
        }
    }
    line
}

/// What a model makes of one micro-batch: its images, their logits and, in stage 1, the
/// codebook loss and the codes chosen.
struct Forward {
    images: Tensor<4>,
    logits: Tensor<4>,
    codebook: Option<(Tensor<1>, Tensor<2, Int>)>,
}

/// What one micro-batch hands back besides its gradients.
struct MicroBatch {
    /// Its loss as numbers, on a logged step.
    numbers: Option<LossNumbers>,
    /// The codes it chose (stage 1).
    indices: Option<Tensor<2, Int>>,
    /// Its reconstructions, detached, when the discriminator trains this step.
    images: Option<Tensor<4>>,
}

/// The model's gradients for the batch `x`, split into the config's micro-batches and shared
/// by the workers ([`training::micro_batch_gradients`]); `forward(replica, worker, images)`.
#[allow(clippy::too_many_arguments)]
fn step_gradients<M>(
    trainee: &WithCritic<M>,
    workers: &[Device],
    objectives: &[Objective],
    config: &TrainConfig,
    step: usize,
    x: Tensor<4>,
    logged: bool,
    forward: impl Fn(&WithCritic<M>, usize, Tensor<4>) -> Forward + Sync,
) -> Result<(GradientsParams, Vec<MicroBatch>), Error>
where
    M: Module + Sync,
    WithCritic<M>: Module + Sync,
{
    let pieces = x.chunk(config.accumulation.max(1), 0);
    let parts = pieces.len() as f64;
    training::micro_batch_gradients(trainee, workers, pieces.len(), |replica, worker, index| {
        let x = pieces[index].clone().to_device(&workers[worker]);
        let out = forward(replica, worker, x.clone());
        let critic = replica.critic_at(&config.loss, step);
        let mut loss = objectives[worker].generator(out.images.clone(), out.logits, x, critic);
        let (codebook_loss, indices) = out.codebook.unzip();
        if let Some(codebook_loss) = &codebook_loss {
            // The codebook terms belong to the total the log reports, as before the objective.
            loss.total = loss.total + codebook_loss.clone();
        }
        let grads = GradientsParams::from_grads(
            loss.total.clone().div_scalar(parts).backward(),
            &replica.model,
        );
        let micro = MicroBatch {
            numbers: logged.then(|| LossNumbers::of(&loss, codebook_loss.as_ref())),
            indices,
            images: critic.map(|_| out.images.detach()),
        };
        Ok((grads, micro))
    })
}

/// The discriminator's step on the batch `real` and the micro-batches' reconstructions, when
/// it trains this step.
#[allow(clippy::too_many_arguments)]
fn critic_update<M>(
    objective: &Objective,
    optimizer: &mut ModuleOptimizer,
    trainee: WithCritic<M>,
    real: Tensor<4>,
    micro: &[MicroBatch],
    learning_rate: f64,
    step: usize,
    device: &Device,
) -> (WithCritic<M>, Option<f32>)
where
    WithCritic<M>: Module,
{
    let fakes: Vec<Tensor<4>> = micro
        .iter()
        .filter_map(|m| m.images.clone())
        .map(|images| images.to_device(device))
        .collect();
    if fakes.is_empty() {
        return (trainee, None);
    }
    critic_step(
        objective,
        optimizer,
        trainee,
        real,
        Tensor::cat(fakes, 0),
        learning_rate,
        step,
    )
}

fn mean_numbers(micro: &[MicroBatch]) -> LossNumbers {
    let parts: Vec<&LossNumbers> = micro.iter().filter_map(|m| m.numbers.as_ref()).collect();
    LossNumbers::mean(&parts)
}

pub fn train(
    config: &TrainConfig,
    pairs_uri: &str,
    options: &TrainOptions,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let model_config = config.model_config()?;
    config.loss.check(model_config.output_sigmoid)?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, ShardSpec::single())?;
    let upstream = run.upstream("pairs", pairs_uri)?;
    let (vgg16, perceptual) = perceptual_input(&mut run, &config.loss, options.vgg16.as_deref())?;
    if let Some(existing) = run.begin(options.force)? {
        return Ok(existing);
    }
    let held_out = held_out_images(&upstream, model_config.image_size)?;
    let workers = workers(config, options)?;
    let device = workers[0].clone();
    device.seed(config.seed);
    let objectives = objectives(&config.loss, vgg16, &workers)?;
    let (mut trainee, mut optimizer, mut progress) = resume(
        &run,
        config,
        model_config.init(&device),
        &model_config,
        &device,
    )?;
    training::materialize(&trainee);
    let mut images =
        config.image_stream(&upstream, model_config.image_size, progress.data_position)?;

    while progress.step < config.steps {
        let step = progress.step;
        let x = images.batch(config.batch_size, &device)?;
        let logged = step.is_multiple_of(config.log_every.max(1)) || step + 1 == config.steps;
        let (grads, micro) = step_gradients(
            &trainee,
            &workers,
            &objectives,
            config,
            step,
            x.clone(),
            logged,
            |replica, _, x| {
                let out = replica.model.forward(x);
                Forward {
                    images: out.images,
                    logits: out.logits,
                    codebook: Some((out.quantized.loss, out.quantized.indices)),
                }
            },
        )?;
        let learning_rate = config.learning_rate_at(step);
        trainee = optimizer.step(learning_rate, trainee, grads);
        let critic_loss;
        (trainee, critic_loss) = critic_update(
            &objectives[0],
            &mut optimizer,
            trainee,
            x.clone(),
            &micro,
            learning_rate,
            step,
            &device,
        );
        for indices in micro.iter().filter_map(|m| m.indices.as_ref()) {
            progress.usage.record(indices, step);
        }

        let restart = config.restart_every > 0
            && step > 0
            && step.is_multiple_of(config.restart_every)
            && step < config.restart_until;
        let mut restarted = 0;
        if restart {
            let dead = progress.usage.dead(step, config.restart_window);
            if dead.iter().any(|d| *d) {
                let z = trainee.model.encode_continuous(x);
                restarted = trainee.model.quantizer.restart_dead_codes(z, &dead);
                progress.usage.mark_restarted(&dead, step);
            }
        }
        if logged {
            let extra = json!({"codebook_usage": progress.usage.share(step, config.restart_window),
                "perplexity": progress.usage.take_counts(), "restarted": restarted});
            let line = step_line(
                step,
                learning_rate,
                &mean_numbers(&micro),
                critic_loss,
                extra,
            );
            log_line(&mut progress, line);
        }
        progress.step += 1;
        progress.data_position = images.position();
        after_step(&run, config, options, &trainee, &optimizer, &progress)?;
    }
    // Usage over the training window too: the held-out set alone is too small to call on
    // every code of a large codebook.
    let mut metrics = Map::new();
    metrics.insert(
        "train_codebook_usage".into(),
        json!(progress.usage.share(config.steps, config.restart_window)),
    );
    metrics.insert("perceptual_loss".into(), json!(perceptual));
    publish(
        &run,
        &trainee.model,
        &model_config,
        &held_out,
        progress.data_position,
        progress.log,
        metrics,
        &device,
        started,
    )
}

/// Parti's stage 2: load stage 1, keep its encoder and codebook exactly as they are, and train
/// a new (larger) decoder on their codes.
pub fn finetune_decoder(
    config: &FinetuneConfig,
    vqgan_uri: &str,
    pairs_uri: &str,
    options: &TrainOptions,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let train_config = &config.train;
    train_config.loss.check(config.output_sigmoid)?;
    let mut run = StageRun::new(
        FINETUNE_STAGE,
        tool(),
        &options.out,
        config,
        ShardSpec::single(),
    )?;
    let stage1 = run.upstream("vqgan", vqgan_uri)?;
    let upstream = run.upstream("pairs", pairs_uri)?;
    let (vgg16, perceptual) =
        perceptual_input(&mut run, &train_config.loss, options.vgg16.as_deref())?;
    if let Some(existing) = run.begin(options.force)? {
        return Ok(existing);
    }
    let workers = workers(train_config, options)?;
    let device = workers[0].clone();
    device.seed(train_config.seed);
    let objectives = objectives(&train_config.loss, vgg16, &workers)?;
    let (stage1_config, frozen) = load_vqgan(&stage1, &device)?;
    let mut model_config = stage1_config.clone();
    model_config.decoder = VitConfig {
        local_convs: stage1_config.decoder.local_convs,
        ..config.decoder_config()?
    };
    model_config.output_sigmoid = config.output_sigmoid;
    let held_out = held_out_images(&upstream, model_config.image_size)?;
    let decoder = if config.warm_start {
        if config.output_sigmoid != stage1_config.output_sigmoid {
            return Err(Error::Usage(format!(
                "warm_start keeps stage 1's output: set output_sigmoid = {}",
                stage1_config.output_sigmoid
            )));
        }
        model_config.decoder_grown_from(&stage1_config.decoder, frozen.decoder.clone(), &device)?
    } else {
        model_config.decoder_init(&device)
    };
    let (mut trainee, mut optimizer, mut progress) =
        resume(&run, train_config, decoder, &model_config, &device)?;
    training::materialize(&trainee);
    let mut model = frozen.clone();
    model.output_sigmoid = config.output_sigmoid;
    let mut images =
        train_config.image_stream(&upstream, model_config.image_size, progress.data_position)?;
    // Frozen: encoded without autodiff. A graph recorded for it would never be consumed by a
    // backward pass and piles up, step after step (400 steps went from 0.4 to 3.7 s each).
    let frozen_encoders: Vec<_> = workers
        .iter()
        .map(|worker| frozen.clone().valid().fork(&worker.clone().inner()))
        .collect();
    while progress.step < train_config.steps {
        let step = progress.step;
        let x = images.batch(train_config.batch_size, &device)?;
        let logged =
            step.is_multiple_of(train_config.log_every.max(1)) || step + 1 == train_config.steps;
        let (grads, micro) = step_gradients(
            &trainee,
            &workers,
            &objectives,
            train_config,
            step,
            x.clone(),
            logged,
            |replica, worker, x| {
                let encoder = &frozen_encoders[worker];
                let codes = Tensor::from_inner(encoder.quantizer.embed(encoder.encode(x.inner())));
                let (images, logits) = model.output(replica.model.forward(codes));
                Forward {
                    images,
                    logits,
                    codebook: None,
                }
            },
        )?;
        let learning_rate = train_config.learning_rate_at(step);
        trainee = optimizer.step(learning_rate, trainee, grads);
        let critic_loss;
        (trainee, critic_loss) = critic_update(
            &objectives[0],
            &mut optimizer,
            trainee,
            x,
            &micro,
            learning_rate,
            step,
            &device,
        );
        if logged {
            let line = step_line(
                step,
                learning_rate,
                &mean_numbers(&micro),
                critic_loss,
                json!({}),
            );
            log_line(&mut progress, line);
        }
        progress.step += 1;
        progress.data_position = images.position();
        after_step(&run, train_config, options, &trainee, &optimizer, &progress)?;
    }
    model.decoder = trainee.model;
    let mut metrics = Map::new();
    metrics.insert("perceptual_loss".into(), json!(perceptual));
    publish(
        &run,
        &model,
        &model_config,
        &held_out,
        progress.data_position,
        progress.log,
        metrics,
        &device,
        started,
    )
}
