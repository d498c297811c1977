//! `train parti`: the encoder-decoder Transformer on `vqgan encode` token shards (captions
//! tokenised on the background reader as rows stream in), optionally starting from a `train
//! text-encoder` encoder.
//!
//! Teacher-forced cross-entropy over the codebook; classifier-free guidance dropout; AdamW or
//! Adafactor with warm-up then exponential decay, clipping and gradient accumulation;
//! checkpoints with exact resume. The manifest carries the weights, the model config, the loss
//! curve (PNG) and validation perplexity / token accuracy; its inputs name the tokenizer, token
//! shards and text encoder, so `infer` needs only this manifest and the VQGAN's.

use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::optim::{AdafactorConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Bool, Device, Int, Tensor};
use nn::data::{HeldOutSample, RowStream, StreamConfig};
use nn::distributed::Group;
use nn::fused::{Autocast, Precision};
use nn::progress::{Curves, Steps, is_midway_evaluation};
use nn::training::{self, GradClip, Publication, Schedule};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use tracing::{info, warn};

use manifests::shards::tokens::{self, TokenRow};
use manifests::{Manifest, ShardSpec, StageRun, Upstream};
use models::parti::{Condition, Parti, PartiConfig, token_accuracy, token_loss};
use models::text_encoder::pad_batch;
use models::{CONFIG_KIND, PARTI_KIND, SamplingConfig, TextTokenizer};
use nn::cli::TrainingOptions;

use crate::{Error, tool};

pub const STAGE: &str = "train.parti";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartiTrainConfig {
    /// tiny, 350M, 750M, 3B or 20B (Parti Table 1).
    pub model: String,
    pub steps: usize,
    /// Sequences per optimiser step (split into `accumulation` micro-batches).
    pub batch_size: usize,
    pub accumulation: usize,
    /// adamw or adafactor.
    pub optimizer: String,
    pub learning_rate: f64,
    pub final_learning_rate: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// The L2 norm gradients are clipped to: each parameter's on its own, or all together
    /// (`grad_clip`).
    pub grad_clip_norm: f32,
    /// `per_tensor` (the default: Burn's clipping, what the presets were tuned with) or
    /// `global` (`torch.nn.utils.clip_grad_norm_`'s norm over all gradients, as Parti
    /// clipped). Written only when global, so configs from before this key keep their identity.
    #[serde(default, skip_serializing_if = "GradClip::is_per_tensor")]
    pub grad_clip: GradClip,
    pub dropout: f64,
    /// Probability that a caption is replaced by the null condition (classifier-free guidance).
    pub cfg_dropout: f64,
    /// Conv-shaped attention window side (odd), 0: full causal attention everywhere.
    pub conv_window: usize,
    pub full_attention_every: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub seed: u64,
    /// Rows held to shuffle across token shards (shards and rows are shuffled anyway).
    pub shuffle_buffer: usize,
    /// The sampling settings this model is recommended with: recorded in the manifest, and what
    /// `infer generate`, `serve` and `eval` use unless told otherwise.
    pub sampling: SamplingConfig,
    /// `f32`, or `bf16`: libtorch's bf16 autocast for the forward and backward passes (tch
    /// only; parameters, gradients and optimizer state stay f32). Written only when bf16, so
    /// configs from before this key keep their identity.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// Micro-batches the background reader keeps ready.
const PREFETCH_BATCHES: usize = 4;

/// Validation rows scored at the end (the first found, shard by shard).
const VALIDATION_LIMIT: usize = 512;

/// Held-out evaluations over a run, for the chart (the last at the end).
const HELD_OUT_POINTS: usize = 6;

impl PartiTrainConfig {
    pub fn preset(name: &str) -> Result<PartiTrainConfig, Error> {
        models::text_encoder::encoder_shape(name)?;
        // Parti: Adafactor, lr 4.5e-5 with 5k warm-up then exponential decay (final ratio
        // 0.025), clipping 4.0, dropout 0.1, global batch 8192.
        let paper = PartiTrainConfig {
            model: name.into(),
            steps: 450_000,
            batch_size: 8192,
            accumulation: 1,
            optimizer: "adafactor".into(),
            learning_rate: 4.5e-5,
            final_learning_rate: 4.5e-5 * 0.025,
            warmup_steps: 5000,
            weight_decay: 4.5e-2,
            grad_clip_norm: 4.0,
            grad_clip: GradClip::PerTensor,
            dropout: 0.1,
            cfg_dropout: 0.1,
            conv_window: 11,
            full_attention_every: 4,
            checkpoint_every: 5000,
            log_every: 100,
            seed: 0,
            shuffle_buffer: 10_000,
            // Parti: guidance 1.2, reranked samples.
            sampling: SamplingConfig {
                samples: 16,
                ..SamplingConfig::default()
            },
            precision: Precision::F32,
        };
        Ok(match name {
            "tiny" => PartiTrainConfig {
                // Measured on the same 512-code tokens (validation perplexity / eval all-accuracy,
                // the tokenizer ceiling 0.78): 1000 steps at 1e-3 -> 5e-5 1.41 / 0.67, 1500 1.32
                // / 0.78, 1500 at 2e-3 -> 1e-4 1.28 / 0.77; on 1024 codes (ceiling 0.82) the
                // last gives 1.37 / 0.81, on the tiny preset's 2048 codes decoded with their
                // neighbours (ceiling 0.856) 1.50 / 0.875, 0.889 through the 1000-step decoder
                // fine-tune (same tokens, so the same Parti), 0.912 with that fine-tune at 2e-3
                // and guidance 1.1.
                steps: 1500,
                batch_size: 32,
                // Two micro-batches of 16, so two cores each take one.
                accumulation: 2,
                optimizer: "adamw".into(),
                learning_rate: 2e-3,
                final_learning_rate: 1e-4,
                warmup_steps: 50,
                weight_decay: 0.01,
                dropout: 0.0,
                conv_window: 5,
                full_attention_every: 3,
                checkpoint_every: 250,
                log_every: 50,
                shuffle_buffer: 512,
                // Sharper than the paper's temperature 1.0: measured with `infer eval` on the
                // tiny preset, all-attribute accuracy rose from 0.23 (1.0) to 0.44 (0.5) and
                // 0.47 (0.3) over the same prompts; on the 1024-code tiny preset, 0.81 (0.5) and
                // 0.83 (0.1), means over seeds 0-3 (0.1 was ahead at every seed, and level with
                // greedy decoding's 0.83); 0.2 gave 0.82 over seeds 1-3. Guidance 1.1 rather than
                // the paper's 1.2: over sampling seeds 0-9, 1.2 read 0.896, 1.1 0.904 and 1.0
                // (off) 0.899 (colour slips to 0.995 below 1.2); 1.4 0.860 and 2.0 0.76 (seeds
                // 0-3).
                sampling: SamplingConfig {
                    temperature: 0.1,
                    guidance_scale: 1.1,
                    ..SamplingConfig::default()
                },
                ..paper
            },
            _ => paper,
        })
    }

    /// What is wrong with the batch settings, if anything.
    pub fn validate(&self) -> Result<(), Error> {
        training::micro_batch_size(self.batch_size, self.accumulation)?;
        GradClip::check(self.grad_clip_norm)?;
        if !(0.0..1.0).contains(&self.dropout) || !(0.0..=1.0).contains(&self.cfg_dropout) {
            return Err(Error::Usage(
                "dropout must be within [0, 1) and cfg_dropout within [0, 1]".into(),
            ));
        }
        Ok(())
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            learning_rate: self.learning_rate,
            final_learning_rate: self.final_learning_rate,
            warmup_steps: self.warmup_steps,
            decay: "exponential".into(),
        }
    }

    fn optimizer(&self) -> Result<ModuleOptimizer, Error> {
        match self.optimizer.as_str() {
            "adamw" => Ok(nn::fused::AdamW {
                beta_2: 0.96,
                weight_decay: self.weight_decay as f32,
                grad_clip_norm: self.grad_clip.per_tensor(self.grad_clip_norm),
                ..Default::default()
            }
            .init()),
            // Burn's Adafactor keeps no first moment (Parti's kept an int8 one, beta1 0.9); the
            // schedule here drives the rate, so its relative step and parameter scaling are off.
            "adafactor" => Ok(AdafactorConfig::new()
                .with_relative_step(false)
                .with_scale_parameter(false)
                .with_weight_decay(self.weight_decay as f32)
                .with_grad_clipping(
                    self.grad_clip
                        .per_tensor(self.grad_clip_norm)
                        .map(GradientClippingConfig::Norm),
                )
                .init()),
            other => Err(Error::Usage(format!(
                "unknown optimizer '{other}' (adamw, adafactor)"
            ))),
        }
    }
}

/// One training example: caption ids (unpadded) and the image's tokens.
#[derive(Debug, Clone)]
pub struct Example {
    pub caption: String,
    pub text: Vec<u32>,
    pub tokens: Vec<u16>,
}

/// Which of `n` captions are replaced by the null condition, each with probability `rate`.
pub fn cfg_drops(rng: &mut impl Rng, n: usize, rate: f64) -> Vec<bool> {
    (0..n)
        .map(|_| rng.random_bool(rate.clamp(0.0, 1.0)))
        .collect()
}

pub fn targets_tensor(examples: &[&Example], device: &Device) -> Tensor<2, Int> {
    let n = examples.first().map(|e| e.tokens.len()).unwrap_or(0);
    let flat: Vec<i32> = examples
        .iter()
        .flat_map(|e| e.tokens.iter().map(|t| i32::from(*t)))
        .collect();
    Tensor::<1, Int>::from_data(flat.as_slice(), device).reshape([examples.len(), n])
}

pub fn text_tensors(
    examples: &[&Example],
    tokenizer: &TextTokenizer,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Bool>) {
    let rows: Vec<&[u32]> = examples.iter().map(|e| e.text.as_slice()).collect();
    pad_batch(&rows, tokenizer.pad_id(), tokenizer.max_length(), device)
}

/// Validation loss (mean cross-entropy) and token accuracy, captions given.
fn validate(
    model: &Parti,
    examples: &[Example],
    tokenizer: &TextTokenizer,
    device: &Device,
) -> (f64, f64) {
    let (mut loss, mut accuracy, mut count) = (0.0, 0.0, 0.0);
    for chunk in examples.chunks(64) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (ids, padding) = text_tensors(&refs, tokenizer, device);
        let condition = model.condition(ids, padding, None);
        let targets = targets_tensor(&refs, device);
        let logits = model.forward(targets.clone(), &condition);
        let l = token_loss(logits.clone(), targets.clone());
        let a = token_accuracy(logits, targets);
        let n = chunk.len() as f64;
        loss += l.into_scalar::<f32>() as f64 * n;
        accuracy += a.into_scalar::<f32>() as f64 * n;
        count += n;
    }
    (loss / count.max(1.0), accuracy / count.max(1.0))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    step: usize,
    /// Rows of the data order consumed by those steps.
    data_position: u64,
    log: String,
    /// Training loss and held-out perplexity / token accuracy by step, for `training.png`.
    #[serde(default)]
    curves: Curves,
}

#[derive(Debug, Clone, Copy)]
pub struct PartiInputs<'a> {
    pub tokens: &'a str,
    pub tokenizer: &'a str,
    pub text_encoder: Option<&'a str>,
}

/// ~5% of keys (by their blake3, `nn::data::is_held_out`) are validation, whatever the sharding.
fn is_validation(key: &str) -> bool {
    nn::data::is_held_out(&manifests::digest_bytes(key.as_bytes()))
}

/// The image grid and codebook size a `vqgan encode` manifest declares.
fn token_shape(stage: &Upstream) -> Result<(usize, usize), Error> {
    let grid = stage.manifest.metric_u64("grid").unwrap_or(0) as usize;
    let codebook = stage.manifest.metric_u64("codebook_size").unwrap_or(0) as usize;
    if grid == 0 || codebook == 0 {
        return Err(Error::Data(format!(
            "{}: not a `vqgan encode` manifest (no grid / codebook_size metrics)",
            stage.location.uri()
        )));
    }
    Ok((grid, codebook))
}

/// A token row as a training example, or `None` (with a warning) when its token count is not
/// the grid's; an error for a token outside the codebook (tokens of another VQGAN).
fn example(
    row: TokenRow,
    (grid, codebook): (usize, usize),
    tokenizer: &TextTokenizer,
    uri: &str,
) -> Result<Option<Example>, Error> {
    if row.tokens.len() != grid * grid {
        warn!(
            "{uri}: row '{}' has {} tokens, skipped",
            row.key,
            row.tokens.len()
        );
        return Ok(None);
    }
    if let Some((at, token)) = row
        .tokens
        .iter()
        .enumerate()
        .find(|&(_, &token)| usize::from(token) >= codebook)
    {
        return Err(Error::Data(format!(
            "{uri}: row '{}' has token {token} at position {at}, outside the manifest's codebook \
             of {codebook}",
            row.key
        )));
    }
    Ok(Some(Example {
        text: tokenizer.encode(&row.caption)?,
        caption: row.caption,
        tokens: row.tokens,
    }))
}

fn token_shards(stage: &Upstream) -> Vec<manifests::Artifact> {
    stage
        .artifacts_of_kind(tokens::KIND)
        .into_iter()
        .cloned()
        .collect()
}

/// Up to `limit` validation examples, read shard by shard until there are enough. Tiny inputs
/// may hold none out: then the first training examples stand in, and the flag says so.
fn validation_examples(
    stage: &Upstream,
    tokenizer: &TextTokenizer,
    shape: (usize, usize),
    limit: usize,
) -> Result<(Vec<Example>, bool), Error> {
    let uri = stage.location.uri();
    let mut sample = HeldOutSample::new(limit);
    for artifact in token_shards(stage) {
        let rows = tokens::read(stage, &artifact)?;
        for row in rows {
            let held_out = is_validation(&row.key);
            if !sample.wants(held_out) {
                continue;
            }
            if let Some(example) = example(row, shape, tokenizer, &uri)? {
                sample.offer(held_out, example);
            }
        }
        if sample.is_full() {
            break;
        }
    }
    Ok(sample.finish())
}

/// Training examples streamed from the token shards (validation rows left out), captions
/// tokenised on the background thread, from row `start` of the seeded order on.
fn example_stream(
    stage: &Upstream,
    tokenizer: &TextTokenizer,
    shape: (usize, usize),
    config: StreamConfig,
    start: u64,
) -> Result<RowStream<Example>, Error> {
    let uri = stage.location.uri();
    let shards = token_shards(stage);
    let sizes = nn::data::shard_sizes(&uri, &shards).map_err(|e| Error::Data(e.to_string()))?;
    let (reader, tokenizer, decode_uri) = (stage.clone(), tokenizer.clone(), uri.clone());
    RowStream::spawn(
        sizes,
        config,
        start,
        move |shard| tokens::read(&reader, &shards[shard]).map_err(|e| e.to_string()),
        move |_, row: TokenRow| {
            if is_validation(&row.key) {
                return Ok(None);
            }
            example(row, shape, &tokenizer, &decode_uri).map_err(|e| e.to_string())
        },
    )
    .map_err(|e| Error::Data(format!("{uri}: {e}")))
}

/// Gradients of one optimizer step over its micro-batches (examples and CFG drops), and where
/// `report` asks, each micro-batch's loss and token accuracy in order (else none). The workers
/// share this process's micro-batches (one replica per CPU core on flex), and the ranks of a job
/// share the step's.
///
/// Only reported steps read a value back from the device: reading one waits for the device to
/// finish the step, and a GPU left waiting for the host to prepare the next batch idles.
/// `dropout_seed` (the run's seed and the step) seeds dropout's generator per micro-batch.
#[allow(clippy::too_many_arguments)]
fn step_gradients(
    model: &Parti,
    workers: &[Device],
    group: &Group,
    micro_batches: &[(Vec<Example>, Vec<bool>)],
    tokenizer: &TextTokenizer,
    precision: Precision,
    dropout_seed: Option<(u64, usize)>,
    report: bool,
) -> Result<(GradientsParams, Vec<(f64, f64)>), Error> {
    let parts = micro_batches.len() as f64;
    let (grads, reports) = training::micro_batch_gradients(
        model,
        workers,
        group,
        micro_batches.len(),
        |replica, worker, index| {
            let device = &workers[worker];
            if let Some((seed, step)) = dropout_seed {
                training::seed_dropout(device, seed, step, index);
            }
            let (examples, drop) = &micro_batches[index];
            let _autocast = Autocast::begin(precision, group.device())?;
            let batch: Vec<&Example> = examples.iter().collect();
            let (ids, padding) = text_tensors(&batch, tokenizer, device);
            let drop = Tensor::<1, Bool>::from_data(drop.as_slice(), device);
            let condition: Condition = replica.condition(ids, padding, Some(drop));
            let targets = targets_tensor(&batch, device);
            let logits = replica.forward(targets.clone(), &condition);
            let accuracy = report.then(|| token_accuracy(logits.clone(), targets.clone()));
            let loss = token_loss(logits, targets);
            let grads =
                GradientsParams::from_grads(loss.clone().div_scalar(parts).backward(), replica);
            let values = accuracy.map(|accuracy| {
                (
                    loss.into_scalar::<f32>() as f64,
                    accuracy.into_scalar::<f32>() as f64,
                )
            });
            Ok::<_, Error>((grads, values))
        },
    )?;
    if !report {
        // Every rank of a job reports on the same steps, so all skip this gather together.
        return Ok((grads, Vec::new()));
    }
    let reports = reports
        .into_iter()
        .filter_map(|(index, values)| values.map(|values| (index, values)))
        .collect();
    Ok((grads, group.gather_in_order(reports)?))
}

pub fn train_parti(
    config: &PartiTrainConfig,
    inputs: &PartiInputs,
    options: &TrainingOptions,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    config.validate()?;
    config
        .sampling
        .validate()
        .map_err(|e| Error::Usage(format!("sampling: {e}")))?;
    config.precision.check_backend()?;
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, ShardSpec::single())?
        .with_checkpoint_fields(&["/checkpoint_every"])?;
    let tokens = run.upstream("tokens", inputs.tokens)?;
    let tokenizer_stage = run.upstream("tokenizer", inputs.tokenizer)?;
    let pretrained = inputs
        .text_encoder
        .map(|uri| run.upstream("text_encoder", uri))
        .transpose()?;
    let group = options.join()?;
    if let Some(existing) = group.begin(&run, options.force)? {
        return Ok(existing);
    }
    let tokenizer = TextTokenizer::from_manifest(&tokenizer_stage)?;
    let (grid, codebook) = token_shape(&tokens)?;
    let (validation, stand_in) =
        validation_examples(&tokens, &tokenizer, (grid, codebook), VALIDATION_LIMIT)?;
    if validation.is_empty() {
        return Err(Error::Data(format!("{}: no training rows", inputs.tokens)));
    }
    if stand_in {
        warn!("the tokens hold no validation rows: validating on training rows");
    }
    info!("{} validation rows", validation.len());

    let workers = nn::backend::training_workers(
        group.device(),
        options.workers,
        training::dropout_workers(config.dropout, config.accumulation),
    )
    .map_err(|e| Error::Usage(e.to_string()))?;
    if config.dropout > 0.0 && workers.len() > 1 {
        return Err(Error::Usage(format!(
            "dropout {} draws from the process's one generator, so its micro-batches run one at \
             a time: one worker per process (--workers 1, one device; a job takes more ranks)",
            config.dropout
        )));
    }
    let device = workers[0].clone();
    device.seed(config.seed);
    let model_config = PartiConfig::preset(
        &config.model,
        tokenizer.vocab_size(),
        tokenizer.max_length(),
        grid,
        codebook,
    )?
    .with_dropout(config.dropout)
    .with_conv_window(config.conv_window)
    .with_full_attention_every(config.full_attention_every);
    let model_config = PartiConfig {
        encoder: model_config.encoder.clone().with_dropout(config.dropout),
        ..model_config
    };
    let mut model = model_config.init(&device);
    if let Some(stage) = &pretrained {
        // The same vocabulary size is not the same tokenizer: ids would mean other pieces.
        if let Some(trained_with) = stage.manifest.inputs.iter().find(|i| i.name == "tokenizer")
            && trained_with.digest != tokenizer_stage.manifest.identity()
        {
            return Err(Error::Usage(format!(
                "{}: its text encoder was trained with the tokenizer {}, not {}",
                stage.location.uri(),
                trained_with.uri,
                tokenizer_stage.location.uri()
            )));
        }
        let (configs, _, _) = models::load_text_encoder(stage, &device)?;
        let expected = model_config.encoder.clone().with_dropout(0.0);
        if configs.text_encoder.clone().with_dropout(0.0) != expected {
            return Err(Error::Usage(format!(
                "{}: its text encoder ({:?}) does not match the '{}' preset's encoder ({:?})",
                stage.location.uri(),
                configs.text_encoder,
                config.model,
                expected
            )));
        }
        models::load_text_encoder_weights(&mut model.encoder, stage)?;
        info!("text encoder initialised from {}", stage.location.uri());
    }
    training::materialize(&model);
    let fresh = Progress {
        step: 0,
        data_position: 0,
        log: String::new(),
        curves: Curves::default(),
    };
    let (mut model, mut optimizer, mut progress) =
        training::resume(&run, &group, model, config.optimizer()?, fresh)?;
    let checkpointing =
        training::Checkpointing::new(config.checkpoint_every, config.steps, options.stop_after)
            .written_by_leader_of(&group);
    let schedule = config.schedule();
    let micro = config.batch_size / config.accumulation;
    let stream_config = StreamConfig {
        seed: config.seed,
        shuffle_buffer: config.shuffle_buffer,
        prefetch: PREFETCH_BATCHES * micro,
    };
    let mut examples = example_stream(
        &tokens,
        &tokenizer,
        (grid, codebook),
        stream_config,
        progress.data_position,
    )?;
    let (loop_started, first_step) = (Instant::now(), progress.step);
    let bar = Steps::new(
        "train parti",
        config.steps,
        progress.step,
        group.is_leader(),
    );
    while progress.step < config.steps {
        let step = progress.step;
        let mut rng = training::step_rng(config.seed, step);
        let learning_rate = schedule.at(step, config.steps);
        let parts = config.accumulation;
        let mut micro_batches = Vec::with_capacity(parts);
        for _ in 0..parts {
            let batch = examples
                .next_items(micro)
                .map_err(|e| Error::Data(format!("{}: {e}", inputs.tokens)))?;
            micro_batches.push((batch, cfg_drops(&mut rng, micro, config.cfg_dropout)));
        }
        let logged = step.is_multiple_of(config.log_every.max(1)) || step + 1 == config.steps;
        let (grads, losses) = step_gradients(
            &model,
            &workers,
            &group,
            &micro_batches,
            &tokenizer,
            config.precision,
            (config.dropout > 0.0).then_some((config.seed, step)),
            logged,
        )?;
        let loss_sum: f64 = losses.iter().map(|(loss, _)| loss).sum();
        let accuracy_sum: f64 = losses.iter().map(|(_, accuracy)| accuracy).sum();
        let grads = config.grad_clip.apply(config.grad_clip_norm, &model, grads);
        model = optimizer.step(learning_rate, model, grads);
        let parts = parts as f64;
        if logged {
            let line = json!({"step": step, "learning_rate": learning_rate,
                "loss": loss_sum / parts, "token_accuracy": accuracy_sum / parts});
            bar.line(&line, &mut progress.log);
            progress.curves.training("loss", step, loss_sum / parts);
        }
        progress.step += 1;
        progress.data_position = examples.position();
        // Held-out points along the way (the last one is the final validation below).
        if group.is_leader() && is_midway_evaluation(step, config.steps, HELD_OUT_POINTS) {
            let (loss, accuracy) = validate(
                &model.valid(),
                &validation,
                &tokenizer,
                &device.clone().inner(),
            );
            progress.curves.held_out_at(
                progress.step,
                &[("perplexity", loss.exp()), ("token_accuracy", accuracy)],
            );
        }
        bar.set_done(progress.step);
        checkpointing.after_step(&run, progress.step, &model, &optimizer, &progress)?;
    }
    bar.finish();

    // Image tokens the job trained on per second of its training loop (all ranks together).
    let tokens_per_second = ((progress.step - first_step) * config.batch_size * grid * grid) as f64
        / loop_started.elapsed().as_secs_f64().max(1e-9);
    let model = model.valid();
    if !group.is_leader() {
        // Rank 0 validates and publishes; the manifest is everyone's result.
        return group.leader_published(&run);
    }
    let eval_device = device.clone().inner();
    let (val_loss, val_accuracy) = validate(&model, &validation, &tokenizer, &eval_device);
    let val_perplexity = val_loss.exp();
    progress.curves.held_out_at(
        progress.step,
        &[
            ("perplexity", val_perplexity),
            ("token_accuracy", val_accuracy),
        ],
    );
    info!(
        "validation perplexity {val_perplexity:.2} (codebook {codebook}), token accuracy {val_accuracy:.3}"
    );
    let mut publication = Publication::new(&run, started);
    publication.weights("parti.safetensors", PARTI_KIND, &model)?;
    publication.config("parti.json", CONFIG_KIND, &model_config)?;
    let chart = nn::plot::training_chart("train parti", &progress.curves)?;
    publication.file("training.png", "image/png", chart)?;
    publication.log(progress.log)?;
    let mut metrics = Map::new();
    let mut put = |name: &str, value: serde_json::Value| metrics.insert(name.into(), value);
    put("val_perplexity", json!(val_perplexity));
    put("val_token_accuracy", json!(val_accuracy));
    put("val_loss", json!(val_loss));
    put("rows_streamed", json!(progress.data_position));
    put("validation_images", json!(validation.len()));
    put("parameters", json!(model.num_params()));
    put(
        "transformer_parameters",
        json!(model_config.transformer_params()),
    );
    put("train_tokens_per_second", json!(tokens_per_second));
    publication.publish(&group, metrics)
}
