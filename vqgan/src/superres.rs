//! `vqgan superres`: Parti's super-resolution model (`models::superres`), trained on pictures
//! alone (no text) to enlarge what the tokenizer decodes.
//!
//! Targets come from a pairs stage at the larger size (`ingest pairs --size 256` of the same
//! source); inputs are made from them in the stage: each target averaged down to the
//! tokenizer's size and, with `input = "tokenizer"`, passed through the tokenizer (encode,
//! decode), so the model learns to enlarge the pictures it will be given rather than clean
//! downscales. No third copy of the data is stored. Training reads random crops (the network
//! is fully convolutional); the held-out evaluation enlarges whole pictures and scores them
//! against the originals beside bicubic upsampling of the same inputs.
//!
//! The machinery is the other training stages': AdamW with warm-up and cosine decay, the
//! batch's micro-batches shared by the workers, checkpoints and an exact resume, rank 0
//! publishing, a metrics log and `training.png`.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use models::superres::{SuperResConfig, SuperResolution, bicubic, downscale};
use models::vqgan::VitVqgan;
use models::{CONFIG_KIND, SUPERRES_KIND, load_vqgan};
use nn::cli::TrainingOptions;
use nn::data::StreamConfig;
use nn::images::{self, ImageSet, Rejected, floats};
use nn::progress::{Curves, Steps, is_midway_evaluation};
use nn::training::{self, GradClip, Publication, Schedule};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use tracing::{info, warn};

use crate::eval::{psnr_db, side_by_side, ssim};
use crate::{Error, tool};
use manifests::shards::add_rejected;
use manifests::{Manifest, ShardSpec, StageRun};

pub const STAGE: &str = "vqgan.superres";

/// Where the model's inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// The tokenizer's reconstruction of the downscaled target: what generation hands over.
    Tokenizer,
    /// The downscaled target itself (no tokenizer needed).
    Downscale,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuperResStageConfig {
    /// The network: tiny (64 -> 256), 512 (256 -> 512) or 1024 (256 -> 1024).
    pub model: String,
    pub input: InputKind,
    /// Side of the training crops at the input's resolution.
    pub patch: usize,
    /// The loss is L1 made smooth within this distance of zero (Charbonnier:
    /// `sqrt(d^2 + e^2)`); 0 is plain L1. Plain L1 keeps the model at its bicubic start: its
    /// gradient has full size however small an error, so the faint detail a fresh model adds
    /// to flat areas (most pixels) outweighs what edges ask for, and the detail is switched
    /// off instead of learned.
    pub charbonnier_epsilon: f64,
    pub steps: usize,
    pub batch_size: usize,
    /// Micro-batches per step (shared by the workers).
    pub accumulation: usize,
    pub learning_rate: f64,
    pub final_learning_rate: f64,
    pub warmup_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    /// Adam's epsilon. The L1 gradients of a near-silent tail are far below Burn's default
    /// (1e-5), which would turn Adam into plain SGD with tiny steps: PyTorch's 1e-8, as WDSR.
    pub epsilon: f64,
    pub weight_decay: f64,
    /// The L2 norm gradients are clipped to: each parameter's on its own, or all together
    /// (`grad_clip`).
    pub grad_clip_norm: f32,
    /// `per_tensor` (the default: Burn's clipping, what the presets were tuned with) or
    /// `global` (`torch.nn.utils.clip_grad_norm_`'s norm over all gradients). Written only
    /// when global, so configs from before this key keep their identity.
    #[serde(default, skip_serializing_if = "GradClip::is_per_tensor")]
    pub grad_clip: GradClip,
    /// Held-out pictures scored at the end (and at a few points for the chart).
    pub held_out: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub seed: u64,
    pub shuffle_buffer: usize,
}

const PREFETCH_BATCHES: usize = 4;
/// Held-out evaluations over a run, for the chart (the last at the end).
const HELD_OUT_POINTS: usize = 4;
/// Held-out pictures enlarged at once.
const EVAL_BATCH: usize = 8;

impl SuperResStageConfig {
    /// `tiny`: 64 -> 256 on the shapes data, inside `make pipeline`'s budget; `512` and `1024`:
    /// Parti's models (256 -> 512, 256 -> 1024) with WDSR's training recipe (crops of 48 input
    /// pixels, batch 16, Adam at 1e-3).
    pub fn preset(name: &str) -> Result<SuperResStageConfig, Error> {
        let paper = |model: &str| SuperResStageConfig {
            model: model.into(),
            input: InputKind::Tokenizer,
            patch: 48,
            charbonnier_epsilon: 1e-2,
            steps: 300_000,
            batch_size: 16,
            accumulation: 1,
            learning_rate: 1e-3,
            final_learning_rate: 1e-5,
            warmup_steps: 1000,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
            grad_clip_norm: 1.0,
            grad_clip: GradClip::PerTensor,
            held_out: 256,
            checkpoint_every: 5000,
            log_every: 100,
            seed: 0,
            shuffle_buffer: 10_000,
        };
        match name {
            "tiny" => Ok(SuperResStageConfig {
                patch: 16,
                steps: 1500,
                accumulation: 2,
                learning_rate: 2e-3,
                warmup_steps: 30,
                held_out: 32,
                checkpoint_every: 250,
                log_every: 50,
                shuffle_buffer: 512,
                ..paper("tiny")
            }),
            "512" | "default" => Ok(paper("512")),
            "1024" => Ok(paper(name)),
            other => Err(Error::Usage(format!(
                "unknown preset '{other}' for vqgan superres (tiny, 512, 1024)"
            ))),
        }
    }

    pub fn model_config(&self) -> Result<SuperResConfig, Error> {
        let config = SuperResConfig::preset(&self.model)?;
        config.check()?;
        if self.patch == 0 || self.patch > config.input_size {
            return Err(Error::Usage(format!(
                "patch {}: crops must fit the {} px inputs",
                self.patch, config.input_size
            )));
        }
        nn::training::micro_batch_size(self.batch_size, self.accumulation)?;
        GradClip::check(self.grad_clip_norm)?;
        if self.held_out == 0 {
            return Err(Error::Usage("held_out must be positive".into()));
        }
        Ok(config)
    }

    fn schedule(&self) -> Schedule {
        Schedule::cosine(
            self.learning_rate,
            self.final_learning_rate,
            self.warmup_steps,
        )
    }

    fn optimizer(&self) -> ModuleOptimizer {
        nn::fused::AdamW {
            beta_1: self.beta1 as f32,
            beta_2: self.beta2 as f32,
            epsilon: self.epsilon as f32,
            weight_decay: self.weight_decay as f32,
            grad_clip_norm: self.grad_clip.per_tensor(self.grad_clip_norm),
        }
        .init()
    }
}

/// What a checkpoint holds besides the model and optimizer records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    step: usize,
    /// Rows of the data order consumed by those steps.
    data_position: u64,
    rejected: Rejected,
    log: String,
    curves: Curves,
}

/// Makes the model's inputs from targets: averaged down by the model's scale and, for
/// `input = "tokenizer"`, encoded and decoded by the frozen tokenizer (no gradients).
struct Degrade {
    scale: usize,
    tokenizer: Option<VitVqgan>,
}

impl Degrade {
    fn inputs(&self, targets: Tensor<4>) -> Tensor<4> {
        let small = downscale(targets.inner(), self.scale);
        let small = match &self.tokenizer {
            Some(tokenizer) => tokenizer.forward(small).images.clamp(0.0, 1.0),
            None => small,
        };
        Tensor::from_inner(small)
    }
}

/// Held-out quality of the model and of bicubic upsampling of the same inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Quality {
    psnr_db: f64,
    ssim: f64,
    bicubic_psnr_db: f64,
    bicubic_ssim: f64,
}

/// Enlarges every held-out picture's input whole and scores model and bicubic against it.
fn evaluate(
    model: &SuperResolution,
    degrade: &Degrade,
    held_out: &ImageSet,
    device: &Device,
) -> Result<Quality, Error> {
    let size = held_out.size;
    let per_image = 3 * size * size;
    let (mut squared, mut ssim_sum, mut bicubic_squared, mut bicubic_ssim) = (0.0, 0.0, 0.0, 0.0);
    for start in (0..held_out.len()).step_by(EVAL_BATCH) {
        let indices: Vec<usize> = (start..(start + EVAL_BATCH).min(held_out.len())).collect();
        let targets = held_out.batch(&indices, device);
        let inputs = degrade.inputs(targets.clone());
        let enlarged = floats(model.forward(inputs.clone()).clamp(0.0, 1.0))?;
        let baseline = floats(bicubic(inputs, degrade.scale).clamp(0.0, 1.0))?;
        let targets = floats(targets)?;
        for ((target, ours), theirs) in targets
            .chunks(per_image)
            .zip(enlarged.chunks(per_image))
            .zip(baseline.chunks(per_image))
        {
            squared += mean_squared_error(target, ours);
            bicubic_squared += mean_squared_error(target, theirs);
            ssim_sum += ssim(target, ours, size);
            bicubic_ssim += ssim(target, theirs, size);
        }
    }
    let count = held_out.len().max(1) as f64;
    Ok(Quality {
        psnr_db: psnr_db(squared / count),
        ssim: ssim_sum / count,
        bicubic_psnr_db: psnr_db(bicubic_squared / count),
        bicubic_ssim: bicubic_ssim / count,
    })
}

fn mean_squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(p, q)| f64::from(p - q).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64
}

/// Up to four held-out pictures, one per row: the input (pixels enlarged as blocks), bicubic,
/// the model, the original.
fn comparison_grid(
    model: &SuperResolution,
    degrade: &Degrade,
    held_out: &ImageSet,
    device: &Device,
) -> Result<Vec<u8>, Error> {
    let rows = held_out.len().min(4);
    let size = held_out.size;
    let indices: Vec<usize> = (0..rows).collect();
    let targets = held_out.batch(&indices, device);
    let inputs = degrade.inputs(targets.clone());
    // Each input pixel as a `scale x scale` block: nearest-neighbour by hand, so the grid
    // shows exactly what the model was given.
    let small = size / degrade.scale;
    let nearest: Vec<f32> = {
        let mut out = vec![0.0; rows * 3 * size * size];
        let inputs = floats(inputs.clone())?;
        for (plane, chunk) in out.chunks_mut(size * size).enumerate() {
            for (i, value) in chunk.iter_mut().enumerate() {
                let (y, x) = (i / size / degrade.scale, i % size / degrade.scale);
                *value = inputs[plane * small * small + y * small + x];
            }
        }
        out
    };
    let columns = [
        nearest,
        floats(bicubic(inputs.clone(), degrade.scale).clamp(0.0, 1.0))?,
        floats(model.forward(inputs).clamp(0.0, 1.0))?,
        floats(targets)?,
    ];
    side_by_side(&columns, rows, size)
}

/// Random positions tried per picture; the crop with the most detail is kept. A crop of flat
/// background (most of a shapes picture, the sky of a photograph) is already perfect under
/// bicubic upsampling and teaches the model nothing.
const CROP_CANDIDATES: usize = 4;

/// Aligned crops, one per picture: a `patch`-pixel square of the inputs and the
/// `patch * scale` square of the targets it enlarges to, at the most detailed of a few
/// positions drawn from `rng` (detail: the summed differences between neighbouring input
/// pixels).
fn crops(
    inputs: Tensor<4>,
    targets: Tensor<4>,
    patch: usize,
    scale: usize,
    rng: &mut impl Rng,
) -> Result<(Tensor<4>, Tensor<4>), Error> {
    let [batch, channels, small, _] = inputs.dims();
    let pixels = floats(inputs.clone())?;
    let plane = small * small;
    let detail = |picture: usize, top: usize, left: usize| -> f32 {
        let mut sum = 0.0;
        for channel in 0..channels {
            let base = (picture * channels + channel) * plane;
            for y in top..top + patch {
                for x in left..left + patch {
                    let here = pixels[base + y * small + x];
                    if x + 1 < left + patch {
                        sum += (pixels[base + y * small + x + 1] - here).abs();
                    }
                    if y + 1 < top + patch {
                        sum += (pixels[base + (y + 1) * small + x] - here).abs();
                    }
                }
            }
        }
        sum
    };
    let (mut input_crops, mut target_crops) = (Vec::with_capacity(batch), Vec::new());
    for picture in 0..batch {
        let mut best = (f32::NEG_INFINITY, 0, 0);
        for _ in 0..CROP_CANDIDATES {
            let (top, left) = (
                rng.random_range(0..=small - patch),
                rng.random_range(0..=small - patch),
            );
            let score = detail(picture, top, left);
            if score > best.0 {
                best = (score, top, left);
            }
        }
        let (_, top, left) = best;
        input_crops.push(inputs.clone().slice([
            picture..picture + 1,
            0..channels,
            top..top + patch,
            left..left + patch,
        ]));
        let (top, left, side) = (top * scale, left * scale, patch * scale);
        target_crops.push(targets.clone().slice([
            picture..picture + 1,
            0..channels,
            top..top + side,
            left..left + side,
        ]));
    }
    Ok((Tensor::cat(input_crops, 0), Tensor::cat(target_crops, 0)))
}

/// `vqgan superres`: trains the model on the pictures of `pairs` (at the model's output size)
/// and publishes weights, config, a comparison grid and held-out PSNR/SSIM beside bicubic's.
/// `vqgan`: the tokenizer whose output it learns to enlarge (`input = "tokenizer"`).
pub fn train_superres(
    config: &SuperResStageConfig,
    pairs: &str,
    vqgan: Option<&str>,
    options: &TrainingOptions,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let model_config = config.model_config()?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, ShardSpec::single())?
        .with_checkpoint_fields(&["/checkpoint_every"])?;
    let upstream = run.upstream("pairs", pairs)?;
    let tokenizer_stage = match (config.input, vqgan) {
        (InputKind::Tokenizer, Some(uri)) => Some(run.upstream("vqgan", uri)?),
        (InputKind::Tokenizer, None) => {
            return Err(Error::Usage(
                "input = \"tokenizer\" needs --vqgan (the tokenizer whose pictures to enlarge); \
                 or set input = \"downscale\""
                    .into(),
            ));
        }
        (InputKind::Downscale, Some(uri)) => {
            warn!("{uri} not used: input = \"downscale\"");
            None
        }
        (InputKind::Downscale, None) => None,
    };
    let group = options.join()?;
    if let Some(existing) = group.begin(&run, options.force)? {
        return Ok(existing);
    }
    let workers =
        nn::backend::training_workers(group.device(), options.workers, config.accumulation)
            .map_err(|e| Error::Usage(e.to_string()))?;
    let device = workers[0].clone();
    // Held until the model is initialised: the generator is the process's, and another thread
    // drawing from it meanwhile (a parallel test, say) would change the initial weights.
    let seeded = nn::backend::seed_exclusively(&device, config.seed);
    let tokenizer = match &tokenizer_stage {
        Some(stage) => {
            let (tokenizer_config, tokenizer) = load_vqgan(stage, &device)?;
            if tokenizer_config.image_size != model_config.input_size {
                return Err(Error::Usage(format!(
                    "{}: the tokenizer makes {} px pictures, model '{}' enlarges {} px ones",
                    stage.location.uri(),
                    tokenizer_config.image_size,
                    config.model,
                    model_config.input_size
                )));
            }
            Some(tokenizer.valid())
        }
        None => None,
    };
    let degrade = Degrade {
        scale: model_config.scale,
        tokenizer,
    };
    let size = model_config.output_size();
    let (held_out, stand_in) = images::held_out(&upstream, size, config.held_out)?;
    if held_out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no {size} px pictures to train on",
            upstream.location.uri()
        )));
    }
    if stand_in {
        warn!("the data holds no picture out: scoring on training pictures");
    }
    let fresh = Progress {
        step: 0,
        data_position: 0,
        rejected: Rejected::new(),
        log: String::new(),
        curves: Curves::default(),
    };
    let initial = model_config.init(&device);
    drop(seeded);
    let (mut model, mut optimizer, mut progress) =
        training::resume(&run, &group, initial, config.optimizer(), fresh)?;
    training::materialize(&model);
    info!(
        "{} -> {} px, {} parameters, {} held-out pictures, {} backend",
        model_config.input_size,
        size,
        model.num_params(),
        held_out.len(),
        nn::backend::backend_name()
    );
    let mut pictures = images::ImageStream::open(
        &upstream,
        size,
        StreamConfig {
            seed: config.seed,
            shuffle_buffer: config.shuffle_buffer,
            prefetch: PREFETCH_BATCHES * config.batch_size,
        },
        progress.data_position,
        progress.rejected.clone(),
    )?;
    let checkpointing =
        training::Checkpointing::new(config.checkpoint_every, config.steps, options.stop_after)
            .written_by_leader_of(&group);
    let bar = Steps::new(
        "vqgan superres",
        config.steps,
        progress.step,
        group.is_leader(),
    );
    let schedule = config.schedule();
    let inner_device = device.clone().inner();
    while progress.step < config.steps {
        let step = progress.step;
        let targets = pictures.batch(config.batch_size, &device)?;
        let inputs = degrade.inputs(targets.clone());
        let mut rng = training::step_rng(config.seed, step);
        let (inputs, targets) = crops(inputs, targets, config.patch, model_config.scale, &mut rng)?;
        let input_parts = inputs.chunk(config.accumulation, 0);
        let target_parts = targets.chunk(config.accumulation, 0);
        let parts = input_parts.len() as f64;
        let (grads, losses) = training::micro_batch_gradients(
            &model,
            &workers,
            &group,
            input_parts.len(),
            |replica, worker, index| {
                let on = &workers[worker];
                let enlarged = replica.forward(input_parts[index].clone().to_device(on));
                let error = enlarged - target_parts[index].clone().to_device(on);
                let l1 = f64::from(error.clone().abs().mean().into_scalar::<f32>());
                let epsilon = config.charbonnier_epsilon;
                let loss = if epsilon > 0.0 {
                    error
                        .powi_scalar(2)
                        .add_scalar(epsilon * epsilon)
                        .sqrt()
                        .mean()
                } else {
                    error.abs().mean()
                };
                let grads = GradientsParams::from_grads(loss.div_scalar(parts).backward(), replica);
                Ok::<_, Error>((grads, l1))
            },
        )?;
        let learning_rate = schedule.at(step, config.steps);
        let grads = config.grad_clip.apply(config.grad_clip_norm, &model, grads);
        model = optimizer.step(learning_rate, model, grads);
        let logged = step.is_multiple_of(config.log_every.max(1)) || step + 1 == config.steps;
        if logged {
            let losses = group.gather_in_order(losses)?;
            let l1 = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
            let line = json!({"step": step, "learning_rate": learning_rate, "l1": l1});
            bar.line(&line, &mut progress.log);
            progress.curves.training("l1", step, l1);
        }
        progress.step += 1;
        progress.data_position = pictures.position();
        progress.rejected = pictures.rejected().clone();
        if group.is_leader() && is_midway_evaluation(step, config.steps, HELD_OUT_POINTS) {
            let quality = evaluate(&model.valid(), &degrade, &held_out, &inner_device)?;
            chart_quality(&mut progress.curves, progress.step, &quality);
        }
        bar.set_done(progress.step);
        checkpointing.after_step(&run, progress.step, &model, &optimizer, &progress)?;
    }
    bar.finish();
    if !group.is_leader() {
        return group.leader_published(&run);
    }
    let model = model.valid();
    let quality = evaluate(&model, &degrade, &held_out, &inner_device)?;
    info!(
        "held-out PSNR {:.2} dB (bicubic {:.2} dB), SSIM {:.3} (bicubic {:.3})",
        quality.psnr_db, quality.bicubic_psnr_db, quality.ssim, quality.bicubic_ssim
    );
    chart_quality(&mut progress.curves, progress.step, &quality);
    let mut publication = Publication::new(&run, started);
    publication.weights("model.safetensors", SUPERRES_KIND, &model)?;
    publication.config("model.json", CONFIG_KIND, &model_config)?;
    let grid = comparison_grid(&model, &degrade, &held_out, &inner_device)?;
    publication.file("comparison.png", "image/png", grid)?;
    let chart = nn::plot::training_chart("vqgan superres", &progress.curves)?;
    publication.file("training.png", "image/png", chart)?;
    publication.log(progress.log)?;
    let mut rejected = progress.rejected;
    add_rejected(&mut rejected, &held_out.rejected);
    let mut metrics = Map::new();
    let mut put = |name: &str, value: serde_json::Value| metrics.insert(name.into(), value);
    put("psnr_db", json!(quality.psnr_db));
    put("ssim", json!(quality.ssim));
    put("bicubic_psnr_db", json!(quality.bicubic_psnr_db));
    put("bicubic_ssim", json!(quality.bicubic_ssim));
    put(
        "psnr_gain_db",
        json!(quality.psnr_db - quality.bicubic_psnr_db),
    );
    put("input", json!(config.input));
    put("input_size", json!(model_config.input_size));
    put("output_size", json!(size));
    put("held_out_images", json!(held_out.len()));
    put("held_out_stood_in", json!(stand_in));
    put("parameters", json!(model.num_params()));
    put("rows_streamed", json!(progress.data_position));
    put("rejected", json!(rejected));
    publication.publish(&group, metrics)
}

fn chart_quality(curves: &mut Curves, step: usize, quality: &Quality) {
    curves.held_out_at(
        step,
        &[
            ("psnr_db", quality.psnr_db),
            ("bicubic_psnr_db", quality.bicubic_psnr_db),
            ("ssim", quality.ssim),
        ],
    );
}
