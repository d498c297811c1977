//! `infer`: turning a trained Parti into images.
//!
//! - [`sample`]: KV-cached autoregressive sampling with classifier-free guidance, top-k/top-p,
//!   reranking by the contrastive pair, decoding with the VQGAN ([`sample::Generator`]).
//! - [`generate`]: pictures for a prompt list, resumable and shared out across batch jobs
//!   (`infer generate`).
//! - [`eval`]: automatic scoring of generated shapes pictures (`infer eval`).
//! - [`captions`]: the evaluation on any data: generated and real pictures of held-out captions
//!   scored by the contrastive model (`infer eval`).
//! - [`serve`]: an HTTP server batching concurrent requests into one sampling loop (`infer serve`).

pub mod bench;
pub mod captions;
pub mod eval;
pub mod generate;
pub mod metrics;
pub mod sample;
pub mod serve;

use std::time::Instant;

use burn::tensor::Tensor;
use bytes::Bytes;
use manifests::{Manifest, ShardSpec, StageRun, Tool, Upstream};
use nn::images::{png_bytes, to_rgb};
use serde_json::{Map, Value, json};
use tracing::info;

use sample::{Generator, PromptImages, SamplingConfig, SamplingSettings};

pub use generate::{Generation, Prompt, PromptList, generate_to};
pub use nn::Error;

pub fn tool() -> Tool {
    Tool {
        name: "infer".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Channel-first pixels -> RGB bytes (row-major).
pub fn to_rgb_bytes(pixels: &[f32], size: usize) -> Vec<u8> {
    to_rgb(pixels, size).into_raw()
}

/// PNG of one image (channel-first pixels in [0, 1]).
pub fn png(pixels: &[f32], size: usize) -> Result<Vec<u8>, Error> {
    png_bytes(&to_rgb(pixels, size))
}

/// All samples of a prompt side by side, kept ones first.
pub fn grid_png(result: &PromptImages, size: usize) -> Result<Vec<u8>, Error> {
    let mut order = result.kept.clone();
    order.extend((0..result.images.len()).filter(|i| !result.kept.contains(i)));
    let mut grid = image::RgbImage::new((size * order.len().max(1)) as u32, size as u32);
    for (column, &i) in order.iter().enumerate() {
        let picture = to_rgb(&result.images[i], size);
        image::imageops::replace(&mut grid, &picture, (column * size) as i64, 0);
    }
    png_bytes(&grid)
}

pub const EVAL_STAGE: &str = "infer.eval";

/// Prompts `eval` samples in one batch: as many as `generate` does by default, so the two
/// sample the same batches (a prompt's pictures do not depend on the batch, its speed does).
const PROMPTS_PER_BATCH: usize = generate::PROMPTS_PER_CHUNK;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Prompts (one object each) spread over every colour, shape and position (shapes data;
    /// 0: none, and no accuracy).
    pub prompts: usize,
    /// Distinct held-out captions for the caption evaluation (any data; 0: none).
    pub captions: usize,
    /// The model's own settings unless told otherwise ([`sampling_settings`]); recorded, so
    /// `generate` and `serve` can sample as measured (`--sampling-from` this manifest).
    pub sampling: SamplingConfig,
}

/// Every colour x shape x position once (~20 s on 2 cores for the tiny model).
pub const EVAL_PROMPTS: usize = 216;

/// Held-out captions the caption evaluation generates by default.
pub const EVAL_CAPTIONS: usize = 64;

/// The settings a command samples with: those `from` records (a `train parti` or `infer eval`
/// manifest), else those the transformer's manifest recommends, under a TOML `file` and the
/// command line's `overrides`; the source says which.
pub fn sampling_settings(
    parti_uri: &str,
    from: Option<&str>,
    file: Option<&str>,
    overrides: Value,
) -> Result<SamplingSettings, Error> {
    let (stage, _) = Upstream::read(from.unwrap_or(parti_uri))?;
    let base = SamplingSettings::from_manifest(&stage)?;
    let settings: SamplingConfig = manifests::config::layered(&base.settings, file, overrides)?;
    settings.validate()?;
    let source = if settings == base.settings {
        base.source
    } else {
        format!("{} with command-line overrides", base.source)
    };
    Ok(SamplingSettings { settings, source })
}

/// The shapes prompts generated and read back: per-attribute accuracy, `samples.png` and
/// `readings.jsonl`.
fn shapes_metrics(
    generator: &Generator,
    config: &EvalConfig,
    run: &StageRun,
    artifacts: &mut Vec<manifests::Artifact>,
    metrics: &mut Map<String, Value>,
) -> Result<(), Error> {
    let objects = eval::eval_objects(config.prompts);
    let prompts: Vec<String> = objects.iter().map(eval::prompt).collect();
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let size = generator.vqgan_config.image_size;
    let mut readings = Vec::new();
    let mut kept_images = Vec::new();
    let mut lines = String::new();
    let bar = nn::progress::bar(
        prompt_refs.len() as u64,
        0,
        "prompts",
        "infer eval",
        nn::progress::bars_shown(),
    );
    for chunk in prompt_refs.chunks(PROMPTS_PER_BATCH) {
        for result in generator.generate(chunk, &config.sampling)? {
            let best = &result.images[result.kept[0]];
            let reading = eval::read_picture(&to_rgb_bytes(best, size), size);
            lines.push_str(&format!(
                "{}\n",
                json!({"prompt": result.prompt, "read": reading.map(|r| json!({
                    "color": shapes::COLORS[r.color].0,
                    "shape": shapes::SHAPES[r.shape],
                    "position": shapes::POSITIONS[r.position]}))})
            ));
            readings.push(reading);
            kept_images.push(best.clone());
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let score = eval::accuracy(&objects, &readings);
    info!(
        "colour {:.3}, shape {:.3}, position {:.3}, all {:.3} over {} prompts",
        score.color, score.shape, score.position, score.all, score.images
    );
    artifacts.extend(write_grid_and_records(
        run,
        ("samples.png", image_grid(&kept_images, size, 9)),
        ("readings.jsonl", lines, readings.len()),
    )?);
    metrics.insert("color_accuracy".into(), json!(score.color));
    metrics.insert("shape_accuracy".into(), json!(score.shape));
    metrics.insert("position_accuracy".into(), json!(score.position));
    metrics.insert("all_accuracy".into(), json!(score.all));
    let (by_shape, by_position) = breakdown(&score);
    info!("all-attribute accuracy by shape: {}", by_shape_line(&score));
    metrics.insert("all_accuracy_by_shape".into(), by_shape);
    metrics.insert("all_accuracy_by_position".into(), by_position);
    metrics.insert("prompts".into(), json!(score.images));
    Ok(())
}

/// An evaluation's picture grid (PNG) and its per-picture records (JSON lines, `rows` of them).
fn write_grid_and_records(
    run: &StageRun,
    (grid_name, grid): (&str, image::RgbImage),
    (records_name, records, rows): (&str, String, usize),
) -> Result<[manifests::Artifact; 2], Error> {
    Ok([
        run.write_artifact(grid_name, "image/png", Bytes::from(png_bytes(&grid)?), None)?,
        run.write_artifact(
            records_name,
            "metrics/jsonl",
            Bytes::from(records),
            Some(rows as u64),
        )?,
    ])
}

/// Pictures (channel-first pixels) in rows of `columns`.
fn image_grid(pictures: &[Vec<f32>], size: usize, columns: usize) -> image::RgbImage {
    let rows = pictures.len().div_ceil(columns).max(1);
    let mut grid = image::RgbImage::new((columns * size) as u32, (rows * size) as u32);
    for (i, pixels) in pictures.iter().enumerate() {
        image::imageops::replace(
            &mut grid,
            &to_rgb(pixels, size),
            ((i % columns) * size) as i64,
            ((i / columns) * size) as i64,
        );
    }
    grid
}

/// Held-out rows read per caption asked for: the shapes data repeats captions, so distinct ones
/// need more rows than captions.
const HELD_OUT_ROWS_PER_CAPTION: usize = 4;

/// The data-agnostic evaluation ([`captions`]): the distinct held-out captions generated, the
/// kept pictures and the real ones scored against every caption; `captions.png` (real and
/// generated side by side) and `captions.jsonl` (per caption: similarities and ranks).
fn caption_metrics(
    generator: &Generator,
    config: &EvalConfig,
    held_out: &nn::images::ImageSet,
    stood_in: bool,
    run: &StageRun,
    artifacts: &mut Vec<manifests::Artifact>,
) -> Result<captions::CaptionScores, Error> {
    let size = generator.vqgan_config.image_size;
    let chosen = captions::distinct(&held_out.captions, config.captions);
    let texts: Vec<&str> = chosen
        .iter()
        .map(|&i| held_out.captions[i].as_str())
        .collect();
    let mut generated = Vec::with_capacity(texts.len());
    let bar = nn::progress::bar(
        texts.len() as u64,
        0,
        "captions",
        "infer eval",
        nn::progress::bars_shown(),
    );
    for chunk in texts.chunks(PROMPTS_PER_BATCH) {
        for result in generator.generate(chunk, &config.sampling)? {
            generated.push(result.images[result.kept[0]].clone());
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let n = texts.len();
    let similarity = |pictures: Tensor<4>| -> Result<Vec<f32>, Error> {
        match (
            generator.image_embeddings(pictures)?,
            generator.text_embeddings(&texts)?,
        ) {
            (Some(pictures), Some(text)) => {
                sample::read_floats(pictures.matmul(text.transpose()), "similarities")
            }
            _ => Err(Error::Data(
                "the caption evaluation needs the reranker".into(),
            )),
        }
    };
    let generated_similarity = similarity(generator.pixel_batch(&generated))?;
    let real_similarity = similarity(held_out.batch(&chosen, &generator.device))?;
    let scores = captions::scores(&generated_similarity, &real_similarity, n, stood_in);
    info!(
        "captions: generated similarity {:.3} (real {:.3}), retrieval top-1 {:.3} (real {:.3}, chance {:.3}), top-5 {:.3} (real {:.3}) over {n} held-out captions",
        scores.generated.similarity,
        scores.real.similarity,
        scores.generated.retrieval_top1,
        scores.real.retrieval_top1,
        scores.chance_top1,
        scores.generated.retrieval_top5,
        scores.real.retrieval_top5,
    );
    let mut lines = String::new();
    let mut side_by_side = Vec::with_capacity(2 * n);
    for (k, &row) in chosen.iter().enumerate() {
        lines.push_str(&format!(
            "{}\n",
            json!({"caption": texts[k], "key": held_out.keys[row],
                "generated_similarity": generated_similarity[k * n + k],
                "real_similarity": real_similarity[k * n + k],
                "generated_rank": captions::own_rank(&generated_similarity, n, k),
                "real_rank": captions::own_rank(&real_similarity, n, k)})
        ));
        let image = 3 * size * size;
        side_by_side.push(held_out.pixels[row * image..(row + 1) * image].to_vec());
        side_by_side.push(generated[k].clone());
    }
    artifacts.extend(write_grid_and_records(
        run,
        ("captions.png", image_grid(&side_by_side, size, 8)),
        ("captions.jsonl", lines, n),
    )?);
    Ok(scores)
}

/// Held-out rows (up to `limit`, decoded at `size`) of the pairs data behind the transformer
/// (its tokens' pairs), and whether training rows stood in because the data held nothing out.
/// `None` when the lineage names no pairs data.
fn held_out_pairs(
    parti: &Upstream,
    size: usize,
    limit: usize,
) -> Result<Option<(nn::images::ImageSet, bool)>, Error> {
    let Some(tokens) = sample::input_of(parti, "tokens") else {
        return Ok(None);
    };
    let (tokens, _) = Upstream::read(&tokens)?;
    let Some(pairs) = sample::input_of(&tokens, "pairs") else {
        return Ok(None);
    };
    let (pairs, _) = Upstream::read(&pairs)?;
    Ok(Some(nn::images::held_out(&pairs, size, limit)?))
}

/// Held-out single-object images of the data the model was trained on, encoded and decoded by
/// its VQGAN and read by the same scorer: what a perfect transformer could reach, since it
/// can only write tokens this tokenizer decodes. `None` without single-object captions.
fn tokenizer_ceiling(
    generator: &Generator,
    held_out: &nn::images::ImageSet,
) -> Result<Option<eval::Accuracy>, Error> {
    let size = generator.vqgan_config.image_size;
    let (indices, objects): (Vec<usize>, Vec<_>) = (0..held_out.len().min(CEILING_IMAGES))
        .filter_map(|i| eval::caption_object(&held_out.captions[i]).map(|o| (i, o)))
        .unzip();
    if indices.is_empty() {
        return Ok(None);
    }
    let image = 3 * size * size;
    let mut readings = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(32) {
        let x = held_out.batch(chunk, &generator.device);
        let decoded = sample::read_floats(
            generator
                .vqgan
                .decode(generator.vqgan.encode(x))
                .clamp(0.0, 1.0),
            "decoded images",
        )?;
        readings.extend(
            decoded
                .chunks(image)
                .map(|pixels| eval::read_picture(&to_rgb_bytes(pixels, size), size)),
        );
    }
    Ok(Some(eval::accuracy(&objects, &readings)))
}

/// All-attribute accuracy per shape and per position, keyed by the captions' words (`null`
/// where nothing was asked).
fn breakdown(score: &eval::Accuracy) -> (Value, Value) {
    let keyed = |names: &[&str], values: &[Option<f64>]| -> Value {
        Value::Object(
            names
                .iter()
                .zip(values)
                .map(|(name, value)| (name.to_string(), json!(value)))
                .collect(),
        )
    };
    (
        keyed(&shapes::SHAPES, &score.all_by_shape),
        keyed(&shapes::POSITIONS, &score.all_by_position),
    )
}

fn by_shape_line(score: &eval::Accuracy) -> String {
    shapes::SHAPES
        .iter()
        .zip(score.all_by_shape)
        .filter_map(|(name, value)| value.map(|v| format!("{name} {v:.3}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first `count` distinct held-out captions of the data the transformer was trained on (its
/// tokens' pairs, its rows read as `size` px pictures): prompts for `generate` when none are
/// given.
pub fn held_out_captions(parti_uri: &str, size: usize, count: usize) -> Result<Vec<String>, Error> {
    let (parti, _) = Upstream::read(parti_uri)?;
    let Some((set, _)) = held_out_pairs(&parti, size, HELD_OUT_ROWS_PER_CAPTION * count)? else {
        return Err(Error::Data(format!(
            "{parti_uri}: its lineage names no pairs data to take captions from"
        )));
    };
    Ok(captions::distinct(&set.captions, count)
        .into_iter()
        .map(|i| set.captions[i].clone())
        .collect())
}

/// Held-out images the tokenizer ceiling reads at most.
const CEILING_IMAGES: usize = 256;

/// `infer eval`: on the shapes data, generates the shapes prompts, reads each kept picture back
/// and publishes per-attribute accuracy with a grid of what was generated, beside the tokenizer's
/// ceiling; on any data, the caption evaluation ([`captions`]) of held-out captions against
/// their real pictures (`metrics.captions`), when the transformer has a text encoder.
pub fn evaluate(
    config: &EvalConfig,
    parti_uri: &str,
    vqgan_uri: Option<&str>,
    out: &str,
    device: &str,
    force: bool,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let mut run = StageRun::new(EVAL_STAGE, tool(), out, config, ShardSpec::single())?;
    let parti = run.upstream("parti", parti_uri)?;
    if let Some(vqgan) = vqgan_uri {
        run.upstream("vqgan", vqgan)?;
    }
    // The generator and the ceiling read these through the transformer's lineage.
    for (name, uri) in [
        ("tokenizer", sample::input_of(&parti, "tokenizer")),
        ("text_encoder", sample::input_of(&parti, "text_encoder")),
    ] {
        if let Some(uri) = uri {
            run.read_through(name, &uri)?;
        }
    }
    if let Some(tokens) = sample::input_of(&parti, "tokens") {
        let tokens = run.read_through("tokens", &tokens)?;
        let mut behind_tokens = vec!["pairs"];
        if vqgan_uri.is_none() {
            behind_tokens.push("vqgan");
        }
        for name in behind_tokens {
            if let Some(uri) = sample::input_of(&tokens, name) {
                run.read_through(name, &uri)?;
            }
        }
    }
    if let Some(existing) = run.begin(force)? {
        return Ok(existing);
    }
    let generator = Generator::load(parti_uri, vqgan_uri, None, device)?;
    let size = generator.vqgan_config.image_size;
    let held_out = held_out_pairs(
        &parti,
        size,
        CEILING_IMAGES.max(HELD_OUT_ROWS_PER_CAPTION * config.captions),
    )?;
    // The shapes scorer reads shapes pictures only: it runs when the held-out captions are the
    // shapes data's (or when there is no data to look at, as before).
    let shapes_data = held_out.as_ref().is_none_or(|(set, _)| {
        !set.captions.is_empty() && set.captions.iter().all(|c| eval::is_shapes_caption(c))
    });
    let mut artifacts = Vec::new();
    let mut metrics = Map::new();
    metrics.insert(
        "data".into(),
        json!(if shapes_data { "shapes" } else { "other" }),
    );
    if shapes_data {
        if config.prompts > 0 {
            shapes_metrics(&generator, config, &run, &mut artifacts, &mut metrics)?;
        } else {
            info!("no shapes prompts asked for (--prompts 0): no accuracy measured");
        }
        if let Some((set, _)) = &held_out
            && let Some(ceiling) = tokenizer_ceiling(&generator, set)?
        {
            info!(
                "tokenizer ceiling (held-out images through the VQGAN): colour {:.3}, shape {:.3}, position {:.3}, all {:.3} over {} images",
                ceiling.color, ceiling.shape, ceiling.position, ceiling.all, ceiling.images
            );
            info!("tokenizer ceiling by shape: {}", by_shape_line(&ceiling));
            let (by_shape, by_position) = breakdown(&ceiling);
            metrics.insert(
                "tokenizer_ceiling".into(),
                json!({"color_accuracy": ceiling.color, "shape_accuracy": ceiling.shape,
                    "position_accuracy": ceiling.position, "all_accuracy": ceiling.all,
                    "images": ceiling.images, "all_accuracy_by_shape": by_shape,
                    "all_accuracy_by_position": by_position, "rejected": set.rejected}),
            );
        }
    }
    match (&held_out, &generator.reranker) {
        (Some((set, stood_in)), Some(_)) if !set.is_empty() && config.captions > 0 => {
            let scores = caption_metrics(&generator, config, set, *stood_in, &run, &mut artifacts)?;
            metrics.insert("captions".into(), json!(scores));
        }
        (None, _) => info!("no caption evaluation: the transformer's lineage names no pairs data"),
        (_, None) => info!(
            "no caption evaluation: the transformer was trained without a text encoder (the scorer)"
        ),
        _ => info!("no caption evaluation: no held-out captions asked for or found"),
    }
    metrics.insert("reranked".into(), json!(generator.reranker.is_some()));
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    Ok(run.publish(artifacts, metrics)?)
}
