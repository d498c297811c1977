//! `vqgan train`: stage 1 on an `ingest pairs` manifest. L2 + VQ losses, AdamW with warm-up and
//! cosine decay, gradient clipping, dead-code restarts; held-out PSNR and codebook usage, the
//! weights (safetensors), a reconstruction grid and the metrics log go into the manifest.

use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Tensor};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::data::{self, ImageSet};
use crate::model::{VitVqgan, VitVqganConfig};
use crate::quantize::usage;
use crate::{Error, tool};
use manifests::{Manifest, ShardSpec, StageRun};

pub const STAGE: &str = "vqgan.train";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model preset: tiny, small or base.
    pub model: String,
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate, reached after `warmup_steps`, then cosine decay to `final_learning_rate`.
    pub learning_rate: f64,
    pub final_learning_rate: f64,
    pub warmup_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub grad_clip_norm: f32,
    /// Restart unused codes every this many steps (0: never) ...
    pub restart_every: usize,
    /// ... until this step, so the codebook settles before training ends.
    pub restart_until: usize,
    pub log_every: usize,
    pub seed: u64,
}

impl TrainConfig {
    pub fn preset(name: &str) -> Result<TrainConfig, Error> {
        let paper = |model: &str| TrainConfig {
            model: model.into(),
            steps: 500_000,
            batch_size: 256,
            // ViT-VQGAN: Adam (0.9, 0.99), warm-up to 1e-4, cosine to 5e-5, weight decay 1e-4.
            learning_rate: 1e-4,
            final_learning_rate: 5e-5,
            warmup_steps: 5000,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 1e-4,
            grad_clip_norm: 1.0,
            restart_every: 100,
            restart_until: 400_000,
            log_every: 100,
            seed: 0,
        };
        match name {
            "tiny" => Ok(TrainConfig {
                steps: 600,
                batch_size: 16,
                // Higher rates stall the tiny transformer at the mean image.
                learning_rate: 5e-4,
                final_learning_rate: 5e-5,
                warmup_steps: 30,
                restart_every: 10,
                restart_until: 450,
                log_every: 25,
                ..paper("tiny")
            }),
            "small" | "base" => Ok(paper(name)),
            other => Err(Error::Usage(format!(
                "unknown preset '{other}' (tiny, small, base)"
            ))),
        }
    }

    pub fn model_config(&self) -> Result<VitVqganConfig, Error> {
        match self.model.as_str() {
            "tiny" => Ok(VitVqganConfig::tiny()),
            "small" => Ok(VitVqganConfig::small()),
            "base" => Ok(VitVqganConfig::base()),
            other => Err(Error::Usage(format!(
                "unknown model '{other}' (tiny, small, base)"
            ))),
        }
    }

    /// Linear warm-up, then cosine decay to the final rate.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.final_learning_rate + (self.learning_rate - self.final_learning_rate) * cosine
    }
}

pub fn psnr_db(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-10)).log10()
}

/// Mean squared error and codebook usage of `model` over `images`, in batches.
fn evaluate(model: &VitVqgan, images: &ImageSet, device: &Device) -> (f64, f64) {
    let (mut squared, mut count) = (0.0, 0usize);
    let mut used = vec![false; model.quantizer.codebook_size()];
    for start in (0..images.len()).step_by(32) {
        let indices: Vec<usize> = (start..(start + 32).min(images.len())).collect();
        let x = images.batch(&indices, device);
        let out = model.forward(x.clone());
        squared += (out.images.detach() - x)
            .powi_scalar(2)
            .mean()
            .into_scalar::<f32>() as f64
            * indices.len() as f64;
        count += indices.len();
        let (batch_used, _) = usage(&out.quantized.indices, used.len());
        for (slot, u) in used.iter_mut().zip(batch_used) {
            *slot |= u;
        }
    }
    let share = used.iter().filter(|u| **u).count() as f64 / used.len() as f64;
    (squared / count.max(1) as f64, share)
}

/// Originals (left) beside reconstructions (right), one held-out image per row.
fn reconstruction_grid(
    model: &VitVqgan,
    images: &ImageSet,
    device: &Device,
) -> Result<Vec<u8>, Error> {
    let rows = images.len().min(8);
    let size = images.size;
    let indices: Vec<usize> = (0..rows).collect();
    let x = images.batch(&indices, device);
    let y = model.forward(x.clone()).images.detach().clamp(0.0, 1.0);
    let to_vec = |t: Tensor<4>| {
        t.into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::Data(format!("{e:?}")))
    };
    let (x, y) = (to_vec(x)?, to_vec(y)?);
    let mut grid = image::RgbImage::new(2 * size as u32, (rows * size) as u32);
    let plane = size * size;
    for row in 0..rows {
        for (column, source) in [&x, &y].into_iter().enumerate() {
            for py in 0..size {
                for px in 0..size {
                    let value = |c: usize| {
                        (source[row * 3 * plane + c * plane + py * size + px] * 255.0).round() as u8
                    };
                    grid.put_pixel(
                        (column * size + px) as u32,
                        (row * size + py) as u32,
                        image::Rgb([value(0), value(1), value(2)]),
                    );
                }
            }
        }
    }
    let mut png = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("reconstruction grid: {e}")))?;
    Ok(png)
}

pub struct TrainOptions {
    pub out: String,
    pub device: String,
    pub force: bool,
}

pub fn train(
    config: &TrainConfig,
    pairs_uri: &str,
    options: &TrainOptions,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let model_config = config.model_config()?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, ShardSpec::single())?;
    let upstream = run.upstream("pairs", pairs_uri)?;
    if let Some(existing) = run.begin(options.force)? {
        return Ok(existing);
    }
    let (train_set, held_out) = data::load(&upstream, model_config.image_size)?;
    if train_set.is_empty() {
        return Err(Error::Data(format!("{pairs_uri}: no training images")));
    }
    let held_out = if held_out.is_empty() {
        &train_set
    } else {
        &held_out
    };
    info!(
        "{} training images, {} held out, {} backend",
        train_set.len(),
        held_out.len(),
        nn::backend::backend_name()
    );

    let device =
        nn::backend::training_device(&options.device).map_err(|e| Error::Usage(e.to_string()))?;
    device.seed(config.seed);
    let mut model = model_config.init(&device);
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(config.beta1 as f32)
        .with_beta_2(config.beta2 as f32)
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(config.grad_clip_norm)))
        .init();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut log = String::new();
    for step in 0..config.steps {
        let indices: Vec<usize> = (0..config.batch_size)
            .map(|_| rng.random_range(0..train_set.len()))
            .collect();
        let x = train_set.batch(&indices, &device);
        let out = model.forward(x.clone());
        let mse = (out.images - x.clone()).powi_scalar(2).mean();
        let loss = mse.clone() + out.quantized.loss.clone();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let learning_rate = config.learning_rate_at(step);
        model = optimizer.step(learning_rate, model, grads);
        let restart = config.restart_every > 0
            && step % config.restart_every == 0
            && step < config.restart_until;
        if restart || step % config.log_every.max(1) == 0 || step + 1 == config.steps {
            let (used, share) = usage(&out.quantized.indices, model.quantizer.codebook_size());
            let mse = mse.into_scalar::<f32>() as f64;
            if step % config.log_every.max(1) == 0 || step + 1 == config.steps {
                let line = json!({"step": step, "learning_rate": learning_rate, "mse": mse, "psnr_db": psnr_db(mse),
                    "vq_loss": out.quantized.loss.into_scalar::<f32>(), "batch_codebook_usage": share});
                info!("{line}");
                log.push_str(&format!("{line}\n"));
            }
            if restart {
                let z = model.encoder.forward(model.patchify(x));
                model.quantizer.restart_dead_codes(z, &used, step);
            }
        }
    }

    let (mse, codebook_usage) = evaluate(&model, held_out, &device);
    let psnr = psnr_db(mse);
    info!("held-out PSNR {psnr:.2} dB, codebook usage {codebook_usage:.3}");
    let mut store = SafetensorsStore::from_bytes(None);
    model
        .save_into(&mut store)
        .map_err(|e| Error::Data(format!("saving weights: {e}")))?;
    let weights = store
        .get_bytes()
        .map_err(|e| Error::Data(format!("saving weights: {e}")))?;
    let artifacts = vec![
        run.write_artifact(
            "model.safetensors",
            "checkpoint",
            Bytes::from(weights),
            None,
        )?,
        run.write_artifact(
            "model.json",
            "config",
            Bytes::from(serde_json::to_vec_pretty(&model_config).unwrap_or_default()),
            None,
        )?,
        run.write_artifact(
            "reconstructions.png",
            "image/png",
            Bytes::from(reconstruction_grid(&model, held_out, &device)?),
            None,
        )?,
        run.write_artifact("metrics.jsonl", "metrics/jsonl", Bytes::from(log), None)?,
    ];
    let mut metrics = serde_json::Map::new();
    metrics.insert("psnr_db".into(), json!(psnr));
    metrics.insert("held_out_mse".into(), json!(mse));
    metrics.insert("codebook_usage".into(), json!(codebook_usage));
    metrics.insert("train_images".into(), json!(train_set.len()));
    metrics.insert("held_out_images".into(), json!(held_out.len()));
    metrics.insert("parameters".into(), json!(model.num_params()));
    metrics.insert("backend".into(), json!(nn::backend::backend_name()));
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    Ok(run.publish(artifacts, metrics)?)
}
