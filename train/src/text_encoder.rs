//! `train text-encoder`: BERT masked-language modelling on the text corpus (and captions) mixed
//! with a symmetric InfoNCE objective between the text encoder and a small image tower on pairs.
//!
//! Steps alternate between the objectives (`contrastive_every`); checkpoints and an exact resume
//! work as in `vqgan train`. The manifest holds the text encoder (which initialises the seq2seq
//! encoder) and, separately, the contrastive pair (image tower + projections) that `infer` uses
//! to rerank samples. Held-out metrics: MLM accuracy and text->image recall@1/@5.

use std::time::Instant;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Bool, Device, Int, Tensor};
use nn::progress::{Curves, Steps, is_midway_evaluation};
use nn::training::{self, GradClip, Publication, Schedule};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::info;

use manifests::shards::add_rejected;
use manifests::shards::text as text_shards;
use manifests::{Manifest, ShardSpec, StageRun, Upstream};
use models::text_encoder::{
    Contrastive, ContrastiveConfig, ImageTowerConfig, PretrainedConfigs, Pretraining, TextEncoder,
    TextEncoderConfig, mask_tokens, mlm_loss, pad_batch,
};
use models::{CONFIG_KIND, CONTRASTIVE_KIND, TEXT_ENCODER_KIND, TextTokenizer};
use nn::cli::TrainingOptions;
use nn::fused;
use nn::images::{self, ImageSet};

use crate::{Error, tool};

pub const STAGE: &str = "train.text_encoder";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderTrainConfig {
    /// Encoder preset: tiny, 350M, 750M, 3B, 20B (the seq2seq encoder of that Parti size).
    pub model: String,
    pub steps: usize,
    /// Sequences per MLM step and pairs per contrastive step.
    pub batch_size: usize,
    pub learning_rate: f64,
    pub final_learning_rate: f64,
    pub warmup_steps: usize,
    /// The L2 norm gradients are clipped to: each parameter's on its own, or all together
    /// (`grad_clip`).
    pub grad_clip_norm: f32,
    /// `per_tensor` (the default: Burn's clipping, what the presets were tuned with) or
    /// `global` (`torch.nn.utils.clip_grad_norm_`'s norm over all gradients). Written only
    /// when global, so configs from before this key keep their identity.
    #[serde(default, skip_serializing_if = "GradClip::is_per_tensor")]
    pub grad_clip: GradClip,
    pub weight_decay: f64,
    /// Share of ordinary tokens selected for MLM (BERT: 0.15).
    pub mask_rate: f64,
    pub dropout: f64,
    /// Every this-many-th step is contrastive, the others MLM (1: contrastive only; 0: MLM only).
    pub contrastive_every: usize,
    pub image_size: usize,
    pub image_d_model: usize,
    pub image_layers: usize,
    pub image_heads: usize,
    pub projection_dim: usize,
    /// Text documents are cut into pieces of about this many words before tokenising.
    pub words_per_piece: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub seed: u64,
}

impl TextEncoderTrainConfig {
    pub fn preset(name: &str) -> Result<TextEncoderTrainConfig, Error> {
        models::text_encoder::encoder_shape(name)?;
        let paper = TextEncoderTrainConfig {
            steps: 100_000,
            model: name.into(),
            batch_size: 256,
            learning_rate: 1e-4,
            final_learning_rate: 1e-5,
            warmup_steps: 5000,
            weight_decay: 0.01,
            grad_clip_norm: 4.0,
            grad_clip: GradClip::PerTensor,
            dropout: 0.1,
            mask_rate: 0.15,
            contrastive_every: 2,
            image_size: 256,
            image_d_model: 768,
            image_layers: 12,
            image_heads: 12,
            projection_dim: 512,
            words_per_piece: 96,
            checkpoint_every: 5000,
            log_every: 100,
            seed: 0,
        };
        Ok(match name {
            "tiny" => TextEncoderTrainConfig {
                steps: 600,
                batch_size: 32,
                learning_rate: 1e-3,
                final_learning_rate: 5e-5,
                warmup_steps: 30,
                dropout: 0.0,
                image_size: 64,
                image_d_model: 96,
                image_layers: 2,
                image_heads: 4,
                projection_dim: 64,
                words_per_piece: 24,
                checkpoint_every: 200,
                log_every: 25,
                ..paper
            },
            _ => paper,
        })
    }

    fn schedule(&self) -> Schedule {
        Schedule::cosine(
            self.learning_rate,
            self.final_learning_rate,
            self.warmup_steps,
        )
    }

    fn is_contrastive(&self, step: usize) -> bool {
        self.contrastive_every > 0 && step % self.contrastive_every == self.contrastive_every - 1
    }

    pub fn encoder_config(&self, tokenizer: &TextTokenizer) -> Result<TextEncoderConfig, Error> {
        Ok(
            TextEncoderConfig::preset(&self.model, tokenizer.vocab_size(), tokenizer.max_length())?
                .with_dropout(self.dropout),
        )
    }

    pub fn contrastive_config(&self, text_d_model: usize) -> ContrastiveConfig {
        ContrastiveConfig::new(
            text_d_model,
            ImageTowerConfig::new(
                self.image_size,
                self.image_d_model,
                self.image_layers,
                self.image_heads,
                4 * self.image_d_model,
            ),
            self.projection_dim,
        )
    }
}

/// Token sequences (unpadded) for MLM, split train / held-out.
struct Sequences {
    train: Vec<Vec<u32>>,
    held_out: Vec<Vec<u32>>,
}

fn pieces(text: &str, words: usize) -> Vec<String> {
    let words_in: Vec<&str> = text.split_whitespace().collect();
    words_in
        .chunks(words.max(1))
        .map(|chunk| chunk.join(" "))
        .collect()
}

fn mlm_sequences(
    tokenizer: &TextTokenizer,
    text: &Upstream,
    captions: (&ImageSet, &ImageSet),
    config: &TextEncoderTrainConfig,
) -> Result<Sequences, Error> {
    let mut sequences = Sequences {
        train: Vec::new(),
        held_out: Vec::new(),
    };
    let mut index = 0usize;
    for artifact in text.artifacts_of_kind(text_shards::KIND) {
        for document in text_shards::read(text, artifact)? {
            for piece in pieces(&document.text, config.words_per_piece) {
                let ids = tokenizer.encode(&piece)?;
                if ids.len() < 2 {
                    continue;
                }
                // Every 20th piece is held out: deterministic, whatever the sharding.
                if index % 20 == 19 {
                    sequences.held_out.push(ids);
                } else {
                    sequences.train.push(ids);
                }
                index += 1;
            }
        }
    }
    for caption in &captions.0.captions {
        sequences.train.push(tokenizer.encode(caption)?);
    }
    for caption in &captions.1.captions {
        sequences.held_out.push(tokenizer.encode(caption)?);
    }
    Ok(sequences)
}

/// Tensors of one MLM batch: inputs, padding, targets, and weights (1 where a target counts).
fn mlm_batch(
    sequences: &[&[u32]],
    tokenizer: &TextTokenizer,
    rate: f64,
    rng: &mut impl Rng,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Bool>, Tensor<2, Int>, Tensor<2>) {
    let masked: Vec<_> = sequences
        .iter()
        .map(|ids| {
            mask_tokens(
                ids,
                rate,
                tokenizer.vocab_size(),
                tokenizer.special_ids(),
                rng,
            )
        })
        .collect();
    let inputs: Vec<&[u32]> = masked.iter().map(|m| m.input.as_slice()).collect();
    let (ids, padding) = pad_batch(&inputs, tokenizer.pad_id(), tokenizer.max_length(), device);
    let [batch, len] = ids.dims();
    let mut targets = vec![0i32; batch * len];
    let mut weights = vec![0f32; batch * len];
    for (row, m) in masked.iter().enumerate() {
        for (column, target) in m.target.iter().take(len).enumerate() {
            if let Some(t) = target {
                targets[row * len + column] = *t as i32;
                weights[row * len + column] = 1.0;
            }
        }
    }
    (
        ids,
        padding,
        Tensor::<1, Int>::from_data(targets.as_slice(), device).reshape([batch, len]),
        Tensor::<1>::from_floats(weights.as_slice(), device).reshape([batch, len]),
    )
}

fn captions_batch(
    images: &ImageSet,
    indices: &[usize],
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<(Tensor<2, Int>, Tensor<2, Bool>), Error> {
    let encoded: Vec<Vec<u32>> = indices
        .iter()
        .map(|&i| tokenizer.encode(&images.captions[i]))
        .collect::<Result<_, _>>()?;
    let rows: Vec<&[u32]> = encoded.iter().map(|r| r.as_slice()).collect();
    Ok(pad_batch(
        &rows,
        tokenizer.pad_id(),
        tokenizer.max_length(),
        device,
    ))
}

/// Held-out text->image retrieval: for each caption, the images ranked by similarity. A hit
/// at k means an image among the top k carries the same caption text (the shapes data repeats
/// captions across pictures, and any of them is a right answer). Returns recall@1, recall@5.
pub fn recall_at(
    encoder: &TextEncoder,
    contrastive: &Contrastive,
    images: &ImageSet,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<(f64, f64), Error> {
    let n = images.len();
    if n == 0 {
        return Ok((0.0, 0.0));
    }
    let (mut text, mut pictures) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(64) {
        let indices: Vec<usize> = (start..(start + 64).min(n)).collect();
        let (ids, padding) = captions_batch(images, &indices, tokenizer, device)?;
        text.push(contrastive.embed_text(encoder.forward(ids, padding.clone()), padding));
        pictures.push(contrastive.embed_images(images.batch(&indices, device)));
    }
    let similarity = Tensor::cat(text, 0).matmul(Tensor::cat(pictures, 0).transpose());
    let ranked = similarity
        .argsort_descending(1)
        .into_data_as::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| Error::Data(format!("reading ranks: {e:?}")))?;
    let (mut at1, mut at5) = (0usize, 0usize);
    for query in 0..n {
        let row = &ranked[query * n..(query + 1) * n];
        let hit = |k: usize| {
            row.iter()
                .take(k)
                .any(|&i| images.captions[i as usize] == images.captions[query])
        };
        at1 += usize::from(hit(1));
        at5 += usize::from(hit(5));
    }
    Ok((at1 as f64 / n as f64, at5 as f64 / n as f64))
}

/// MLM accuracy on held-out sequences, with masking drawn from a fixed stream.
fn mlm_accuracy(
    model: &Pretraining,
    sequences: &[Vec<u32>],
    tokenizer: &TextTokenizer,
    config: &TextEncoderTrainConfig,
    device: &Device,
) -> f64 {
    let mut rng = training::step_rng(config.seed ^ 0x5eed, 0);
    let (mut correct, mut total) = (0.0, 0.0);
    for chunk in sequences.chunks(64) {
        let rows: Vec<&[u32]> = chunk.iter().map(|s| s.as_slice()).collect();
        let (ids, padding, targets, weights) =
            mlm_batch(&rows, tokenizer, config.mask_rate, &mut rng, device);
        let count = weights.clone().sum().into_scalar::<f32>() as f64;
        let logits = fused::linear(&model.mlm_head, model.encoder.forward(ids, padding));
        let (_, accuracy) = mlm_loss(logits, targets, weights);
        correct += accuracy.into_scalar::<f32>() as f64 * count;
        total += count;
    }
    if total > 0.0 { correct / total } else { 0.0 }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    step: usize,
    log: String,
    /// MLM and contrastive losses and held-out MLM accuracy / recall@1 by step, for
    /// `training.png`.
    #[serde(default)]
    curves: Curves,
}

/// Held-out evaluations over a run, for the chart (the last at the end).
const HELD_OUT_POINTS: usize = 5;

pub struct TextEncoderInputs<'a> {
    pub tokenizer: &'a str,
    pub text: &'a str,
    pub pairs: &'a str,
}

fn optimizer(config: &TextEncoderTrainConfig) -> ModuleOptimizer {
    nn::fused::AdamW {
        beta_2: 0.98,
        weight_decay: config.weight_decay as f32,
        grad_clip_norm: config.grad_clip.per_tensor(config.grad_clip_norm),
        ..Default::default()
    }
    .init()
}

pub fn train_text_encoder(
    config: &TextEncoderTrainConfig,
    inputs: &TextEncoderInputs,
    options: &TrainingOptions,
) -> Result<Manifest, Error> {
    // In-batch negatives need the whole contrastive batch in one place.
    if options.workers.is_some_and(|workers| workers != 1) {
        return Err(Error::Usage(
            "--workers: `train text-encoder` trains on one worker".into(),
        ));
    }
    if config.batch_size == 0 {
        return Err(Error::Usage("batch_size must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&config.dropout) {
        return Err(Error::Usage("dropout must be within [0, 1)".into()));
    }
    GradClip::check(config.grad_clip_norm)?;
    let started = Instant::now();
    let mut run = StageRun::new(STAGE, tool(), &options.out, config, ShardSpec::single())?
        .with_checkpoint_fields(&["/checkpoint_every"])?;
    let tokenizer_stage = run.upstream("tokenizer", inputs.tokenizer)?;
    let text = run.upstream("text", inputs.text)?;
    let pairs = run.upstream("pairs", inputs.pairs)?;
    let group = options.join()?;
    if let Some(existing) = group.begin(&run, options.force)? {
        return Ok(existing);
    }
    let tokenizer = TextTokenizer::from_manifest(&tokenizer_stage)?;
    let (train_images, held_out_images) = images::load(&pairs, config.image_size)?;
    let mut rejected = train_images.rejected.clone();
    add_rejected(&mut rejected, &held_out_images.rejected);
    if train_images.is_empty() {
        return Err(Error::Data(format!("{}: no training pairs", inputs.pairs)));
    }
    let held_out_images = if held_out_images.is_empty() {
        train_images.clone()
    } else {
        held_out_images
    };
    let sequences = mlm_sequences(&tokenizer, &text, (&train_images, &held_out_images), config)?;
    info!(
        "{} MLM sequences ({} held out), {} pairs ({} held out)",
        sequences.train.len(),
        sequences.held_out.len(),
        train_images.len(),
        held_out_images.len()
    );

    let device =
        nn::backend::training_device(group.device()).map_err(|e| Error::Usage(e.to_string()))?;
    device.seed(config.seed);
    let encoder_config = config.encoder_config(&tokenizer)?;
    let contrastive_config = config.contrastive_config(encoder_config.d_model);
    let model = Pretraining {
        encoder: encoder_config.init(&device),
        mlm_head: LinearConfig::new(encoder_config.d_model, encoder_config.vocab_size)
            .init(&device),
        contrastive: contrastive_config.init(&device),
    };
    let fresh = Progress {
        step: 0,
        log: String::new(),
        curves: Curves::default(),
    };
    let (mut model, mut optimizer, mut progress) =
        training::resume(&run, &group, model, optimizer(config), fresh)?;
    let checkpointing =
        training::Checkpointing::new(config.checkpoint_every, config.steps, options.stop_after)
            .written_by_leader_of(&group);
    let schedule = config.schedule();
    // The rows of each batch this rank computes (all of them in one process).
    let own: Vec<usize> = (0..config.batch_size)
        .filter(|&row| group.owns(row))
        .collect();
    let own_rows: Vec<i64> = own.iter().map(|&row| row as i64).collect();
    let own_rows = Tensor::<1, Int>::from_data(own_rows.as_slice(), &device);
    let alone = group.world_size() == 1;
    // Held-out MLM accuracy and text->image recall@1 / @5.
    let held_out_readings = |model: &Pretraining, device: &Device| {
        let accuracy = mlm_accuracy(model, &sequences.held_out, &tokenizer, config, device);
        let recall = recall_at(
            &model.encoder,
            &model.contrastive,
            &held_out_images,
            &tokenizer,
            device,
        )?;
        Ok::<_, Error>((accuracy, recall))
    };
    let bar = Steps::new(
        "train text-encoder",
        config.steps,
        progress.step,
        group.is_leader(),
    );
    while progress.step < config.steps {
        let step = progress.step;
        let mut rng = training::step_rng(config.seed, step);
        if config.dropout > 0.0 {
            training::seed_dropout(&device, config.seed, step, group.rank());
        }
        let learning_rate = schedule.at(step, config.steps);
        let contrastive = config.is_contrastive(step);
        // `loss` is this rank's share (its gradients summed over the ranks are the batch's);
        // for the log, its value counts `loss_weight` times and its MLM accuracy `count` times
        // in the sums over the ranks. Read back only on logged steps.
        let (loss, loss_weight, accuracy) = if contrastive {
            let indices: Vec<usize> = (0..config.batch_size)
                .map(|_| rng.random_range(0..train_images.len()))
                .collect();
            let indices: Vec<usize> = own.iter().map(|&row| indices[row]).collect();
            let (ids, padding) = captions_batch(&train_images, &indices, &tokenizer, &device)?;
            let text = model
                .contrastive
                .embed_text(model.encoder.forward(ids, padding.clone()), padding);
            let pictures = model
                .contrastive
                .embed_images(train_images.batch(&indices, &device));
            let loss = if alone {
                model.contrastive.loss(text, pictures)
            } else {
                // The whole batch's embeddings, ours with their graph, in one exchange: every
                // rank computes the whole loss, and its gradients reach the parameters through
                // its own rows.
                let width = text.dims()[1];
                let both = group.whole_batch(Tensor::cat(vec![text, pictures], 1), &device)?;
                let [_, columns] = both.dims();
                let text = both.clone().narrow(1, 0, width);
                let pictures = both.narrow(1, width, columns - width);
                model.contrastive.loss(text, pictures)
            };
            (loss, 1.0 / group.world_size() as f64, None)
        } else {
            let rows: Vec<&[u32]> = (0..config.batch_size)
                .map(|_| sequences.train[rng.random_range(0..sequences.train.len())].as_slice())
                .collect();
            let (ids, padding, targets, weights) =
                mlm_batch(&rows, &tokenizer, config.mask_rate, &mut rng, &device);
            if alone {
                let logits = fused::linear(&model.mlm_head, model.encoder.forward(ids, padding));
                let (loss, accuracy) = mlm_loss(logits, targets, weights);
                (loss, 1.0, Some((accuracy, 1.0)))
            } else {
                let batch_count = weights.clone().sum().into_scalar::<f32>() as f64;
                let weights = weights.select(0, own_rows.clone());
                let count = weights.clone().sum().into_scalar::<f32>() as f64;
                let logits = fused::linear(
                    &model.mlm_head,
                    model.encoder.forward(
                        ids.select(0, own_rows.clone()),
                        padding.select(0, own_rows.clone()),
                    ),
                );
                let (loss, accuracy) =
                    mlm_loss(logits, targets.select(0, own_rows.clone()), weights);
                // The mean over this rank's masked tokens, weighted to its share of the batch's.
                let loss = loss.mul_scalar(count / batch_count.max(1.0));
                (loss, 1.0, Some((accuracy, count.max(1.0))))
            }
        };
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        if contrastive && !alone {
            // The temperature enters every rank's copy of the whole loss: count it once.
            let id = model.contrastive.logit_scale.id;
            if let Some(grad) = grads.remove::<1>(id) {
                grads.register::<1>(id, grad.div_scalar(group.world_size() as f64));
            }
        }
        let grads = group.all_reduce_gradients(&model, grads)?;
        let grads = config.grad_clip.apply(config.grad_clip_norm, &model, grads);
        model = optimizer.step(learning_rate, model, grads);
        if step % config.log_every.max(1) < config.contrastive_every.max(1)
            || step + 1 == config.steps
        {
            let value = loss.into_scalar::<f32>() as f64 * loss_weight;
            let numbers = match accuracy {
                Some((accuracy, count)) => {
                    (value, accuracy.into_scalar::<f32>() as f64 * count, count)
                }
                None => (value, 0.0, 0.0),
            };
            let all = group.gather_in_order(vec![(group.rank(), numbers)])?;
            let sum = |pick: fn(&(f64, f64, f64)) -> f64| all.iter().map(pick).sum::<f64>();
            let (loss, correct, counted) = (sum(|n| n.0), sum(|n| n.1), sum(|n| n.2));
            let objective = if contrastive { "contrastive" } else { "mlm" };
            let mut line = json!({"step": step, "objective": objective,
                "learning_rate": learning_rate, "loss": loss as f32});
            if !contrastive {
                line["mlm_accuracy"] = json!((correct / counted.max(1.0)) as f32);
            }
            bar.line(&line, &mut progress.log);
            progress.curves.training(objective, step, loss);
        }
        progress.step += 1;
        // Held-out points along the way (the last one is the final evaluation).
        if group.is_leader() && is_midway_evaluation(step, config.steps, HELD_OUT_POINTS) {
            let (accuracy, (recall, _)) =
                held_out_readings(&model.valid(), &device.clone().inner())?;
            progress.curves.held_out_at(
                progress.step,
                &[("mlm_accuracy", accuracy), ("recall_at_1", recall)],
            );
        }
        bar.set_done(progress.step);
        checkpointing.after_step(&run, progress.step, &model, &optimizer, &progress)?;
    }
    bar.finish();

    let eval_model = model.valid();
    if !group.is_leader() {
        // Rank 0 evaluates and publishes; the manifest is everyone's result.
        return group.leader_published(&run);
    }
    let eval_device =
        nn::backend::device(group.device()).map_err(|e| Error::Usage(e.to_string()))?;
    let (mlm_accuracy, (recall_at_1, recall_at_5)) = held_out_readings(&eval_model, &eval_device)?;
    // Chance level of recall@1: how often a random image shares the query's caption.
    let n = held_out_images.len() as f64;
    let chance = held_out_images
        .captions
        .iter()
        .map(|c| held_out_images.captions.iter().filter(|d| *d == c).count() as f64 / n)
        .sum::<f64>()
        / n;
    info!(
        "held-out MLM accuracy {mlm_accuracy:.3}, text->image recall@1 {recall_at_1:.3} (chance {chance:.3}), recall@5 {recall_at_5:.3}"
    );
    let held_out_line = json!({"step": config.steps, "held_out": {"mlm_accuracy": mlm_accuracy,
        "recall_at_1": recall_at_1, "recall_at_5": recall_at_5, "recall_at_1_chance": chance}});
    progress.log.push_str(&format!("{held_out_line}\n"));
    progress.curves.held_out_at(
        progress.step,
        &[("mlm_accuracy", mlm_accuracy), ("recall_at_1", recall_at_1)],
    );
    let configs = PretrainedConfigs {
        text_encoder: encoder_config,
        contrastive: contrastive_config,
    };
    let mut publication = Publication::new(&run, started);
    publication.weights(
        "text_encoder.safetensors",
        TEXT_ENCODER_KIND,
        &eval_model.encoder,
    )?;
    publication.weights(
        "contrastive.safetensors",
        CONTRASTIVE_KIND,
        &eval_model.contrastive,
    )?;
    publication.config("models.json", CONFIG_KIND, &configs)?;
    let chart = nn::plot::training_chart("train text-encoder", &progress.curves)?;
    publication.file("training.png", "image/png", chart)?;
    publication.log(progress.log)?;
    let mut metrics = Map::new();
    let mut put = |name: &str, value: Value| metrics.insert(name.into(), value);
    put("mlm_accuracy", json!(mlm_accuracy));
    put("recall_at_1", json!(recall_at_1));
    put("recall_at_5", json!(recall_at_5));
    put("recall_at_1_chance", json!(chance));
    put("held_out_pairs", json!(held_out_images.len()));
    put("rejected", json!(rejected));
    put("held_out_sequences", json!(sequences.held_out.len()));
    put("parameters", json!(eval_model.encoder.num_params()));
    publication.publish(&group, metrics)
}
