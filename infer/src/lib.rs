//! `infer`: turning a trained Parti into images.
//!
//! - [`sample`]: KV-cached autoregressive sampling with classifier-free guidance, top-k/top-p,
//!   reranking by the contrastive pair, decoding with the VQGAN ([`sample::Generator`]).
//! - [`eval`]: automatic scoring of generated shapes pictures (`infer eval`).
//! - [`serve`]: an HTTP server batching concurrent requests into one sampling loop (`infer serve`).

pub mod bench;
pub mod eval;
pub mod sample;
pub mod serve;

use std::time::Instant;

use bytes::Bytes;
use manifests::{Location, Manifest, ShardSpec, StageRun, Tool, Upstream};
use nn::images::{png_bytes, to_rgb};
use serde_json::{Map, Value, json};
use tracing::info;

use sample::{Generator, PromptImages, SamplingConfig, SamplingSettings};

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

/// `infer generate`: per prompt `p`, the kept samples as `prompt-PPP-sample-K.png` (K = rank
/// after reranking), all samples as `prompt-PPP-grid.png`, and `generations.json` listing
/// prompts, files, seeds, settings, scores and the digests of the manifests used.
pub fn generate_to(
    generator: &Generator,
    prompts: &[&str],
    sampling: &SamplingSettings,
    out: &str,
) -> Result<serde_json::Value, Error> {
    let started = Instant::now();
    let config = &sampling.settings;
    let out = Location::parse(out)?;
    // In chunks, so the sampling batch stays a sensible size and the bar moves; a prompt's
    // images do not depend on the prompts it is batched with.
    let bar = nn::progress::bar(prompts.len() as u64, 0, "prompts", "infer generate");
    let mut results = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(PROMPTS_PER_BATCH) {
        results.extend(generator.generate(chunk, config)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let size = generator.vqgan_config.image_size;
    let mut records = Vec::new();
    for (p, result) in results.iter().enumerate() {
        let mut files = Vec::new();
        for (rank, &i) in result.kept.iter().enumerate() {
            let name = format!("prompt-{p:03}-sample-{rank}.png");
            out.join(&name)
                .put(Bytes::from(png(&result.images[i], size)?))?;
            files.push(json!({"file": name, "sample": i,
                "score": result.scores.as_ref().map(|s| s[i])}));
        }
        let grid = format!("prompt-{p:03}-grid.png");
        out.join(&grid).put(Bytes::from(grid_png(result, size)?))?;
        records.push(json!({"prompt": result.prompt, "kept": files, "grid": grid,
            "scores": result.scores, "reranked": result.scores.is_some()}));
    }
    let record = json!({
        "prompts": records,
        "settings": config,
        "settings_from": sampling.source,
        "model": generator.name,
        "manifests": generator.provenance.iter().map(|(uri, digest)| json!({"uri": uri, "digest": digest})).collect::<Vec<_>>(),
        "backend": nn::backend::backend_name(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    out.join("generations.json").put(Bytes::from(
        serde_json::to_vec_pretty(&record).map_err(|e| Error::Data(e.to_string()))?,
    ))?;
    Ok(record)
}

pub const EVAL_STAGE: &str = "infer.eval";

/// Prompts `generate` and `eval` sample in one batch.
const PROMPTS_PER_BATCH: usize = 16;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Prompts (one object each) spread over every colour, shape and position.
    pub prompts: usize,
    /// The model's own settings unless told otherwise ([`sampling_settings`]); recorded, so
    /// `generate` and `serve` can sample as measured (`--sampling-from` this manifest).
    pub sampling: SamplingConfig,
}

/// Every colour x shape x position once (~20 s on 2 cores for the tiny model).
pub const EVAL_PROMPTS: usize = 216;

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

/// Held-out single-object images of the data the model was trained on, encoded and decoded by
/// its VQGAN and read by the same scorer: what a perfect transformer could reach, since it
/// can only write tokens this tokenizer decodes, with the held-out rows the image policy
/// refused. `None` when the lineage has no pairs data or no single-object captions.
fn tokenizer_ceiling(
    generator: &Generator,
    parti_uri: &str,
) -> Result<Option<(eval::Accuracy, nn::images::Rejected)>, Error> {
    let (parti, _) = Upstream::read(parti_uri)?;
    let Some(tokens) = sample::input_of(&parti, "tokens") else {
        return Ok(None);
    };
    let (tokens, _) = Upstream::read(&tokens)?;
    let Some(pairs) = sample::input_of(&tokens, "pairs") else {
        return Ok(None);
    };
    let (pairs, _) = Upstream::read(&pairs)?;
    let size = generator.vqgan_config.image_size;
    let (held_out, _) = nn::images::held_out(&pairs, size, CEILING_IMAGES)?;
    let (indices, objects): (Vec<usize>, Vec<_>) = (0..held_out.len())
        .filter_map(|i| eval::caption_object(&held_out.captions[i]).map(|o| (i, o)))
        .unzip();
    if indices.is_empty() {
        return Ok(None);
    }
    let image = 3 * size * size;
    let mut readings = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(32) {
        let x = held_out.batch(chunk, &generator.device);
        let decoded = generator
            .vqgan
            .decode(generator.vqgan.encode(x))
            .clamp(0.0, 1.0)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::Data(format!("decoded images: {e:?}")))?;
        readings.extend(
            decoded
                .chunks(image)
                .map(|pixels| eval::read_picture(&to_rgb_bytes(pixels, size), size)),
        );
    }
    Ok(Some((
        eval::accuracy(&objects, &readings),
        held_out.rejected,
    )))
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

/// Held-out images the tokenizer ceiling reads at most.
const CEILING_IMAGES: usize = 256;

/// `infer eval`: generates the shapes prompts, reads each kept picture back, and publishes
/// per-attribute accuracy with a grid of what was generated.
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
    let objects = eval::eval_objects(config.prompts);
    let prompts: Vec<String> = objects.iter().map(eval::prompt).collect();
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let size = generator.vqgan_config.image_size;
    let mut readings = Vec::new();
    let mut kept_images = Vec::new();
    let mut lines = String::new();
    let bar = nn::progress::bar(prompt_refs.len() as u64, 0, "prompts", "infer eval");
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
    let columns = 9usize;
    let rows = kept_images.len().div_ceil(columns).max(1);
    let mut grid = image::RgbImage::new((columns * size) as u32, (rows * size) as u32);
    for (i, pixels) in kept_images.iter().enumerate() {
        let picture = to_rgb(pixels, size);
        image::imageops::replace(
            &mut grid,
            &picture,
            ((i % columns) * size) as i64,
            ((i / columns) * size) as i64,
        );
    }
    let artifacts = vec![
        run.write_artifact(
            "samples.png",
            "image/png",
            Bytes::from(png_bytes(&grid)?),
            None,
        )?,
        run.write_artifact(
            "readings.jsonl",
            "metrics/jsonl",
            Bytes::from(lines),
            Some(readings.len() as u64),
        )?,
    ];
    let mut metrics = Map::new();
    metrics.insert("color_accuracy".into(), json!(score.color));
    metrics.insert("shape_accuracy".into(), json!(score.shape));
    metrics.insert("position_accuracy".into(), json!(score.position));
    metrics.insert("all_accuracy".into(), json!(score.all));
    let (by_shape, by_position) = breakdown(&score);
    info!("all-attribute accuracy by shape: {}", by_shape_line(&score));
    metrics.insert("all_accuracy_by_shape".into(), by_shape);
    metrics.insert("all_accuracy_by_position".into(), by_position);
    metrics.insert("prompts".into(), json!(score.images));
    if let Some((ceiling, rejected)) = tokenizer_ceiling(&generator, parti_uri)? {
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
                "all_accuracy_by_position": by_position, "rejected": rejected}),
        );
    }
    metrics.insert("reranked".into(), json!(generator.reranker.is_some()));
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    Ok(run.publish(artifacts, metrics)?)
}
