//! `vqgan train` (stage 1 on an `ingest pairs` manifest) and `vqgan finetune-decoder` (Parti's
//! stage 2: encoder and codebook frozen, a larger decoder trained alone), on one loop.
//!
//! Both: AdamW with warm-up and cosine decay, gradient clipping, the [`crate::loss`] objective
//! (pixel terms, VGG-16 perceptual term, adversarial term with its discriminator),
//! checkpoints every N steps in the run's work folder, and an exact resume of a killed run (same
//! command, same config: it continues from the last checkpoint and ends with the same weights
//! and losses as an uninterrupted run). Held-out PSNR and codebook usage, the weights
//! (safetensors), a reconstruction grid and the metrics log go into the manifest.

use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Tensor};
use bytes::Bytes;
use models::vqgan::{CodeUsage, VitConfig, VitVqgan, VitVqganConfig};
use models::{CONFIG_KIND, VQGAN_KIND, load_vqgan};
use nn::cli::TrainingOptions;
use nn::distributed::Group;
use nn::images::{self, ImageSet, Rejected};
use nn::progress::{Curves, Steps, is_midway_evaluation};
use nn::training::{self, Publication};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use crate::config::{FinetuneConfig, HELD_OUT_LIMIT, TrainConfig};
use crate::eval::{self, reconstruction_grid};
use crate::loss::{LossConfig, Objective, Vgg16Features, WithCritic};
use crate::step::{Forward, MicroBatch, critic_update, mean_numbers, step_gradients, step_line};
use crate::{Error, tool};
use manifests::shards::add_rejected;
use manifests::{Manifest, ShardSpec, StageRun, Upstream};

pub const STAGE: &str = "vqgan.train";
pub const FINETUNE_STAGE: &str = "vqgan.finetune_decoder";

/// What both stages read besides their config (stage 2 also reads stage 1's manifest).
pub struct Inputs<'a> {
    /// The `ingest pairs` manifest (or its folder).
    pub pairs: &'a str,
    /// torchvision VGG-16 weights as safetensors (local path or bucket URI), for the
    /// perceptual term; without them the term is off and the run says so.
    pub vgg16: Option<&'a str>,
}

/// What a checkpoint holds besides the model and optimizer records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    /// Steps done.
    step: usize,
    /// Rows of the data order consumed by those steps.
    data_position: u64,
    /// Training rows the image policy refused among them, by reason.
    #[serde(default)]
    rejected: Rejected,
    usage: CodeUsage,
    log: String,
    /// Training loss and held-out PSNR / SSIM / codebook usage by step, for `training.png`.
    #[serde(default)]
    curves: Curves,
}

/// Held-out evaluations over a run, for the chart (the last at the end).
const HELD_OUT_POINTS: usize = 5;

/// Puts a held-out reading on the chart at `step`.
fn chart_quality(curves: &mut Curves, step: usize, quality: &eval::Quality) {
    curves.held_out_at(
        step,
        &[
            ("psnr_db", quality.psnr_db),
            ("ssim", quality.ssim),
            ("codebook_usage", quality.codebook_usage),
        ],
    );
}

/// The held-out images of a pairs manifest, at the model's size, up to [`HELD_OUT_LIMIT`]; and
/// whether training images stand in, where the data holds none out (warned). An error naming
/// the pairs and the size when no image of it decodes at that size.
pub(crate) fn held_out_images(upstream: &Upstream, size: usize) -> Result<(ImageSet, bool), Error> {
    let (held_out, stand_in) = images::held_out(upstream, size, HELD_OUT_LIMIT)?;
    if held_out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no image of it decodes at the model's {size} px (rejected: {})",
            upstream.location.uri(),
            json!(held_out.rejected)
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
    Ok((held_out, stand_in))
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
            run.source_bytes("vgg16", uri, &bytes)?;
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

/// The trained module with its discriminator (when the adversarial term is on), the optimizer
/// and the loop's progress: from the run's last checkpoint, or fresh.
fn resume<M>(
    run: &StageRun,
    group: &Group,
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
        rejected: Rejected::new(),
        usage: CodeUsage::new(model_config.quantizer.codebook_size),
        log: String::new(),
        curves: Curves::default(),
    };
    let trainee = WithCritic {
        model,
        critic: config
            .loss
            .discriminator(model_config.image_size)
            .map(|d| d.init(device)),
    };
    training::resume(run, group, trainee, config.optimizer(), fresh)
}

/// What both stages set up before their loop: the run's workers and objectives.
struct Setup<'a> {
    run: &'a StageRun,
    config: &'a TrainConfig,
    options: &'a TrainingOptions,
    /// This process's place in the job (alone, or one rank of several).
    group: Group,
    workers: Vec<Device>,
    objectives: Vec<Objective>,
    /// What the run did about the perceptual term, for the manifest.
    perceptual: String,
    started: Instant,
}

impl Setup<'_> {
    fn device(&self) -> &Device {
        &self.workers[0]
    }

    /// Weights, config, reconstruction grid and log, then the manifest with held-out metrics.
    fn publish(
        &self,
        model: &VitVqgan,
        model_config: &VitVqganConfig,
        held_out: &ImageSet,
        mut progress: Progress,
        mut metrics: Map<String, Value>,
    ) -> Result<Manifest, Error> {
        if !self.group.is_leader() {
            // Rank 0 evaluates and publishes; the manifest is everyone's result.
            return self.group.leader_published(self.run);
        }
        let device = self.device();
        let quality = eval::evaluate(model, held_out, device)?;
        info!(
            "held-out PSNR {:.2} dB, SSIM {:.3}, codebook usage {:.3}",
            quality.psnr_db, quality.ssim, quality.codebook_usage
        );
        chart_quality(&mut progress.curves, progress.step, &quality);
        let mut publication = Publication::new(self.run, self.started);
        publication.weights("model.safetensors", VQGAN_KIND, model)?;
        publication.config("model.json", CONFIG_KIND, model_config)?;
        let grid = reconstruction_grid(model, held_out, device)?;
        publication.file("reconstructions.png", "image/png", grid)?;
        let chart =
            nn::plot::training_chart(&self.run.stage().replace('.', " "), &progress.curves)?;
        publication.file("training.png", "image/png", chart)?;
        publication.log(progress.log)?;
        let mut put = |name: &str, value: Value| metrics.insert(name.into(), value);
        put("psnr_db", json!(quality.psnr_db));
        put("ssim", json!(quality.ssim));
        put("held_out_mse", json!(quality.mse));
        put("codebook_usage", json!(quality.codebook_usage));
        put("codebook_perplexity", json!(quality.perplexity));
        put("rows_streamed", json!(progress.data_position));
        let mut rejected = progress.rejected;
        add_rejected(&mut rejected, &held_out.rejected);
        put("rejected", json!(rejected));
        put("held_out_images", json!(held_out.len()));
        put("parameters", json!(model.num_params()));
        put("perceptual_loss", json!(self.perceptual));
        publication.publish(&self.group, metrics)
    }

    /// The steps from `progress` to the end: each step's gradients over the workers
    /// (`forward(replica, worker, images)`), the optimizer and critic updates, then
    /// `after_update(trainee, progress, micro-batches, images, step, logged)`, which returns the
    /// stage's own fields for a logged step's metrics line; checkpoints on schedule, and
    /// `held_out` read through `as_vqgan(model)` at a few points for the chart.
    #[allow(clippy::too_many_arguments)]
    fn train_loop<M>(
        &self,
        upstream: &Upstream,
        image_size: usize,
        held_out: &ImageSet,
        as_vqgan: impl Fn(&M) -> VitVqgan,
        (mut trainee, mut optimizer, mut progress): (WithCritic<M>, ModuleOptimizer, Progress),
        forward: impl Fn(&WithCritic<M>, usize, Tensor<4>) -> Forward + Sync,
        mut after_update: impl FnMut(
            &mut WithCritic<M>,
            &mut Progress,
            &[MicroBatch],
            Tensor<4>,
            usize,
            bool,
        ) -> Value,
    ) -> Result<(WithCritic<M>, Progress), Error>
    where
        M: Module + Sync,
        WithCritic<M>: Module + Sync,
    {
        let config = self.config;
        let device = self.device().clone();
        let mut images = config.image_stream(
            upstream,
            image_size,
            progress.data_position,
            progress.rejected.clone(),
        )?;
        let checkpointing = training::Checkpointing::new(
            config.checkpoint_every,
            config.steps,
            self.options.stop_after,
        )
        .written_by_leader_of(&self.group);
        let bar = Steps::new(
            &self.run.stage().replace('.', " "),
            config.steps,
            progress.step,
            self.group.is_leader(),
        );
        while progress.step < config.steps {
            let step = progress.step;
            let x = images.batch(config.batch_size, &device)?;
            let logged = step.is_multiple_of(config.log_every.max(1)) || step + 1 == config.steps;
            let (grads, micro) = step_gradients(
                &trainee,
                &self.workers,
                &self.group,
                &self.objectives,
                config,
                step,
                x.clone(),
                logged,
                &forward,
            )?;
            let learning_rate = config.learning_rate_at(step);
            let grads = config
                .grad_clip
                .apply(config.grad_clip_norm, &trainee, grads);
            trainee = optimizer.step(learning_rate, trainee, grads);
            let critic_loss;
            (trainee, critic_loss) = critic_update(
                &self.objectives[0],
                config,
                &mut optimizer,
                trainee,
                x.clone(),
                &micro,
                learning_rate,
                step,
                &device,
            );
            let extra = after_update(&mut trainee, &mut progress, &micro, x, step, logged);
            if logged {
                let numbers = mean_numbers(&micro);
                let line = step_line(step, learning_rate, &numbers, critic_loss, extra);
                bar.line(&line, &mut progress.log);
                progress.curves.training("loss", step, numbers.total);
                progress.curves.training("mse", step, numbers.mse);
            }
            progress.step += 1;
            progress.data_position = images.position();
            progress.rejected = images.rejected().clone();
            // Held-out points along the way (the last one is the final evaluation).
            if self.group.is_leader() && is_midway_evaluation(step, config.steps, HELD_OUT_POINTS) {
                let model = as_vqgan(&trainee.model).valid();
                let quality = eval::evaluate(&model, held_out, &device.clone().inner())?;
                chart_quality(&mut progress.curves, progress.step, &quality);
            }
            bar.set_done(progress.step);
            checkpointing.after_step(self.run, progress.step, &trainee, &optimizer, &progress)?;
        }
        bar.finish();
        Ok((trainee, progress))
    }
}

/// Stage setup shared by both commands: the run begun (or the finished manifest when nothing
/// changed), its inputs recorded, workers and objectives made.
fn begin<'a>(
    run: &'a mut StageRun,
    config: &'a TrainConfig,
    inputs: &Inputs,
    options: &'a TrainingOptions,
) -> Result<Result<(Setup<'a>, Upstream), Manifest>, Error> {
    let started = Instant::now();
    let upstream = run.upstream("pairs", inputs.pairs)?;
    let (vgg16, perceptual) = perceptual_input(run, &config.loss, inputs.vgg16)?;
    let group = options.join()?;
    if let Some(existing) = group.begin(run, options.force)? {
        return Ok(Err(existing));
    }
    let workers =
        nn::backend::training_workers(group.device(), options.workers, config.accumulation.max(1))
            .map_err(|e| Error::Usage(e.to_string()))?;
    workers[0].seed(config.seed);
    let objectives = objectives(&config.loss, vgg16, &workers)?;
    let setup = Setup {
        run,
        config,
        options,
        group,
        workers,
        objectives,
        perceptual,
        started,
    };
    Ok(Ok((setup, upstream)))
}

pub fn train(
    config: &TrainConfig,
    inputs: &Inputs,
    options: &TrainingOptions,
) -> Result<Manifest, Error> {
    let model_config = config.model_config()?;
    config.loss.check(model_config.output_sigmoid)?;
    config.precision.check_backend()?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, ShardSpec::single())?
        .with_checkpoint_fields(&["/checkpoint_every"])?;
    let (setup, upstream) = match begin(&mut run, config, inputs, options)? {
        Ok(begun) => begun,
        Err(existing) => return Ok(existing),
    };
    let (held_out, _) = held_out_images(&upstream, model_config.image_size)?;
    let device = setup.device().clone();
    let resumed = resume(
        setup.run,
        &setup.group,
        config,
        model_config.init(&device),
        &model_config,
        &device,
    )?;
    training::materialize(&resumed.0);
    let (trainee, progress) = setup.train_loop(
        &upstream,
        model_config.image_size,
        &held_out,
        VitVqgan::clone,
        resumed,
        |replica, _, x| {
            let out = replica.model.forward(x);
            Forward {
                images: out.images,
                logits: out.logits,
                codebook: Some((out.quantized.loss, out.quantized.indices)),
            }
        },
        |trainee, progress, micro, x, step, logged| {
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
            if !logged {
                return json!({});
            }
            json!({"codebook_usage": progress.usage.share(step, config.restart_window),
                "perplexity": progress.usage.take_counts(), "restarted": restarted})
        },
    )?;
    // Usage over the training window too: the held-out set alone is too small to call on
    // every code of a large codebook.
    let mut metrics = Map::new();
    metrics.insert(
        "train_codebook_usage".into(),
        json!(progress.usage.share(config.steps, config.restart_window)),
    );
    setup.publish(&trainee.model, &model_config, &held_out, progress, metrics)
}

/// Parti's stage 2: load stage 1, keep its encoder and codebook exactly as they are, and train
/// a new (larger) decoder on their codes.
pub fn finetune_decoder(
    config: &FinetuneConfig,
    vqgan_uri: &str,
    inputs: &Inputs,
    options: &TrainingOptions,
) -> Result<Manifest, Error> {
    let train_config = &config.train;
    train_config.loss.check(config.output_sigmoid)?;
    train_config.precision.check_backend()?;
    let mut run = StageRun::new(
        FINETUNE_STAGE,
        tool(),
        &options.out,
        config,
        ShardSpec::single(),
    )?
    .with_checkpoint_fields(&["/train/checkpoint_every"])?;
    let stage1 = run.upstream("vqgan", vqgan_uri)?;
    let (setup, upstream) = match begin(&mut run, train_config, inputs, options)? {
        Ok(begun) => begun,
        Err(existing) => return Ok(existing),
    };
    let device = setup.device().clone();
    let (stage1_config, frozen) = load_vqgan(&stage1, &device)?;
    let mut model_config = stage1_config.clone();
    model_config.decoder = VitConfig {
        local_convs: stage1_config.decoder.local_convs,
        ..config.decoder_config()?
    };
    model_config.output_sigmoid = config.output_sigmoid;
    let (held_out, _) = held_out_images(&upstream, model_config.image_size)?;
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
    let resumed = resume(
        setup.run,
        &setup.group,
        train_config,
        decoder,
        &model_config,
        &device,
    )?;
    training::materialize(&resumed.0);
    let mut model = frozen.clone();
    model.output_sigmoid = config.output_sigmoid;
    // Frozen: encoded without autodiff. A graph recorded for it would never be consumed by a
    // backward pass and piles up, step after step (400 steps went from 0.4 to 3.7 s each).
    let frozen_encoders: Vec<_> = setup
        .workers
        .iter()
        .map(|worker| frozen.clone().valid().fork(&worker.clone().inner()))
        .collect();
    let as_vqgan = |decoder: &_| {
        let mut whole = model.clone();
        whole.decoder = Clone::clone(decoder);
        whole
    };
    let (trainee, progress) = setup.train_loop(
        &upstream,
        model_config.image_size,
        &held_out,
        as_vqgan,
        resumed,
        |replica, worker, x| {
            let encoder = &frozen_encoders[worker];
            // The frozen encoder's codes in f32 under `precision = "bf16"` too: the codes
            // `vqgan encode` gives Parti, which the decoder is tuned to decode.
            let indices = {
                let _f32 = nn::fused::Autocast::pause();
                encoder.encode(x.inner())
            };
            let codes = Tensor::from_inner(encoder.quantizer.embed(indices));
            let (images, logits) = model.output(replica.model.forward(codes));
            Forward {
                images,
                logits,
                codebook: None,
            }
        },
        |_, _, _, _, _, _| json!({}),
    )?;
    model.decoder = trainee.model;
    setup.publish(&model, &model_config, &held_out, progress, Map::new())
}
