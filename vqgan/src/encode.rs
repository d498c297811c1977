//! Using a trained tokenizer: `vqgan encode` (pairs shards -> token shards, one per pairs shard,
//! resumable shard by shard), `vqgan reconstruct` (held-out quality into a manifest) and
//! `vqgan decode` (tokens -> PNGs).

use std::sync::Arc;
use std::time::Instant;

use arrow_array::types::UInt16Type;
use arrow_array::{Array, ListArray, RecordBatch, StringArray, UInt16Array};
use arrow_schema::{DataType, Field, Schema};
use burn::tensor::{Device, Int, Tensor};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use tracing::{info, warn};

use crate::eval::{self, floats};
use crate::model::VitVqgan;
use crate::{Error, load_vqgan, tool};
use manifests::{Artifact, Location, Manifest, ShardSpec, StageRun, Upstream, table};

pub const ENCODE_STAGE: &str = "vqgan.encode";
pub const RECONSTRUCT_STAGE: &str = "vqgan.reconstruct";
pub const TOKENS_KIND: &str = "parquet/tokens";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeConfig {
    /// Images per forward pass.
    pub batch_size: usize,
}

impl Default for EncodeConfig {
    fn default() -> Self {
        EncodeConfig { batch_size: 64 }
    }
}

pub fn tokens_schema(grid: usize, codebook_size: usize) -> Arc<Schema> {
    let metadata: std::collections::HashMap<String, String> = [
        ("parti.grid".to_string(), grid.to_string()),
        ("parti.codebook_size".to_string(), codebook_size.to_string()),
    ]
    .into_iter()
    .collect();
    Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("caption", DataType::Utf8, false),
            Field::new(
                "tokens",
                DataType::List(Arc::new(Field::new("item", DataType::UInt16, true))),
                false,
            ),
        ],
        metadata,
    ))
}

/// One encoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub key: String,
    pub caption: String,
    /// `grid * grid` codes in raster order.
    pub tokens: Vec<u16>,
}

pub fn tokens_to_parquet(
    uri: &str,
    rows: &[TokenRow],
    grid: usize,
    codebook_size: usize,
) -> Result<Bytes, Error> {
    let schema = tokens_schema(grid, codebook_size);
    let tokens = ListArray::from_iter_primitive::<UInt16Type, _, _>(
        rows.iter()
            .map(|r| Some(r.tokens.iter().map(|t| Some(*t)).collect::<Vec<_>>())),
    );
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.key))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.caption),
            )),
            Arc::new(tokens),
        ],
    )
    .map_err(|e| Error::Data(format!("{uri}: {e}")))?;
    Ok(table::write_parquet(
        uri,
        schema,
        &[batch],
        table::writer_properties(8192, true),
    )?)
}

pub fn tokens_from_parquet(uri: &str, bytes: Bytes) -> Result<Vec<TokenRow>, Error> {
    let mut rows = Vec::new();
    for batch in table::read_parquet(uri, bytes)? {
        let keys = table::column::<StringArray>(uri, &batch, "key")?;
        let captions = table::column::<StringArray>(uri, &batch, "caption")?;
        let tokens = table::column::<ListArray>(uri, &batch, "tokens")?;
        for row in 0..batch.num_rows() {
            let list = tokens.value(row);
            let values = list.as_any().downcast_ref::<UInt16Array>().ok_or_else(|| {
                Error::Data(format!("{uri}: column 'tokens' is not list<uint16>"))
            })?;
            rows.push(TokenRow {
                key: keys.value(row).to_string(),
                caption: captions.value(row).to_string(),
                tokens: values.values().to_vec(),
            });
        }
    }
    Ok(rows)
}

/// Every token row of a `vqgan encode` manifest (digest-checked), in shard order.
pub fn read_token_rows(stage: &Upstream) -> Result<Vec<TokenRow>, Error> {
    let mut rows = Vec::new();
    for artifact in stage.artifacts_of_kind(TOKENS_KIND) {
        rows.extend(read_token_shard(stage, artifact)?);
    }
    Ok(rows)
}

/// The rows of one token shard of a `vqgan encode` manifest (digest-checked).
pub fn read_token_shard(stage: &Upstream, artifact: &Artifact) -> Result<Vec<TokenRow>, Error> {
    let uri = stage.artifact_location(artifact)?.uri();
    tokens_from_parquet(&uri, stage.read_artifact(artifact)?)
}

/// Decoded images of one pairs shard at the model's size; rows that fail are counted.
struct ShardImages {
    keys: Vec<String>,
    captions: Vec<String>,
    pixels: Vec<f32>,
    rejected: usize,
}

fn read_pairs_shard(uri: &str, bytes: Bytes, size: usize) -> Result<ShardImages, Error> {
    let mut shard = ShardImages {
        keys: Vec::new(),
        captions: Vec::new(),
        pixels: Vec::new(),
        rejected: 0,
    };
    let plane = size * size;
    for batch in table::read_parquet(uri, bytes)? {
        let keys = table::column::<StringArray>(uri, &batch, "key")?;
        let captions = table::column::<StringArray>(uri, &batch, "caption")?;
        let images = table::column::<arrow_array::BinaryArray>(uri, &batch, "image")?;
        for row in 0..batch.num_rows() {
            let key = keys.value(row);
            let image = match image::load_from_memory(images.value(row)) {
                Ok(image) => image.to_rgb8(),
                Err(e) => {
                    warn!("{uri}: row '{key}': skipped, {e}");
                    shard.rejected += 1;
                    continue;
                }
            };
            let image = if image.dimensions() == (size as u32, size as u32) {
                image
            } else {
                image::imageops::resize(
                    &image,
                    size as u32,
                    size as u32,
                    image::imageops::FilterType::Lanczos3,
                )
            };
            let start = shard.pixels.len();
            shard.pixels.resize(start + 3 * plane, 0.0);
            for (i, pixel) in image.pixels().enumerate() {
                for c in 0..3 {
                    shard.pixels[start + c * plane + i] = f32::from(pixel.0[c]) / 255.0;
                }
            }
            shard.keys.push(key.to_string());
            shard.captions.push(captions.value(row).to_string());
        }
    }
    Ok(shard)
}

fn tokens_of(indices: Tensor<2, Int>) -> Result<Vec<u16>, Error> {
    indices
        .into_data_as::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| Error::Data(format!("reading tokens: {e:?}")))?
        .into_iter()
        .map(|t| u16::try_from(t).map_err(|_| Error::Data(format!("token {t} exceeds u16"))))
        .collect()
}

/// Encodes images `[n, 3, size, size]` (flattened) in batches.
fn encode_pixels(
    model: &VitVqgan,
    pixels: &[f32],
    size: usize,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<u16>>, Error> {
    let per_image = 3 * size * size;
    let tokens_per_image = model.grid * model.grid;
    let mut out = Vec::new();
    for chunk in pixels.chunks(per_image * batch_size.max(1)) {
        let n = chunk.len() / per_image;
        let x = Tensor::<1>::from_floats(chunk, device).reshape([n, 3, size, size]);
        let tokens = tokens_of(model.encode(x))?;
        out.extend(tokens.chunks(tokens_per_image).map(|t| t.to_vec()));
    }
    Ok(out)
}

/// `vqgan encode`: one token shard per pairs shard. A killed run keeps the shards it finished.
pub fn encode(
    config: &EncodeConfig,
    vqgan_uri: &str,
    pairs_uri: &str,
    out: &str,
    device: &str,
    force: bool,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let mut run = StageRun::new(ENCODE_STAGE, tool(), out, config, ShardSpec::single())?;
    let stage = run.upstream("vqgan", vqgan_uri)?;
    let pairs = run.upstream("pairs", pairs_uri)?;
    if let Some(existing) = run.begin(force)? {
        return Ok(existing);
    }
    let device = nn::backend::device(device).map_err(|e| Error::Usage(e.to_string()))?;
    let (model_config, model) = load_vqgan(&stage, &device)?;
    let (size, grid) = (model_config.image_size, model_config.grid());
    let codebook_size = model_config.quantizer.codebook_size;
    let shards = pairs.artifacts_of_kind("parquet/pairs");
    let progress = indicatif::ProgressBar::new(shards.len() as u64);
    let (mut artifacts, mut rows, mut rejected) = (Vec::new(), 0u64, 0u64);
    for artifact in shards {
        let name = artifact
            .uri
            .rsplit('/')
            .next()
            .unwrap_or(&artifact.uri)
            .replace("pairs", "tokens");
        let relative = format!("tokens/{name}");
        if let Some(done) = run.finished_artifact_noted(&relative)? {
            rows += done.artifact.rows.unwrap_or(0);
            rejected += done.note["rejected"].as_u64().unwrap_or(0);
            artifacts.push(done.artifact);
            progress.inc(1);
            continue;
        }
        let uri = pairs.artifact_location(artifact)?.uri();
        let shard = read_pairs_shard(&uri, pairs.read_artifact(artifact)?, size)?;
        let tokens = encode_pixels(&model, &shard.pixels, size, config.batch_size, &device)?;
        let token_rows: Vec<TokenRow> = shard
            .keys
            .into_iter()
            .zip(shard.captions)
            .zip(tokens)
            .map(|((key, caption), tokens)| TokenRow {
                key,
                caption,
                tokens,
            })
            .collect();
        let target = run.out().join(&relative).uri();
        let bytes = tokens_to_parquet(&target, &token_rows, grid, codebook_size)?;
        rows += token_rows.len() as u64;
        rejected += shard.rejected as u64;
        artifacts.push(run.write_artifact_noted(
            &relative,
            TOKENS_KIND,
            bytes,
            Some(token_rows.len() as u64),
            json!({"rejected": shard.rejected}),
        )?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let mut metrics = Map::new();
    metrics.insert("rows".into(), json!(rows));
    metrics.insert("rejected".into(), json!(rejected));
    metrics.insert("grid".into(), json!(grid));
    metrics.insert("codebook_size".into(), json!(codebook_size));
    metrics.insert("image_size".into(), json!(size));
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    info!("{rows} images encoded, {rejected} rejected");
    Ok(run.publish(artifacts, metrics)?)
}

/// `vqgan reconstruct`: held-out images through the tokenizer; PSNR/SSIM/usage into a manifest
/// and a side-by-side grid PNG.
pub fn reconstruct(
    vqgan_uri: &str,
    pairs_uri: &str,
    out: &str,
    device: &str,
    force: bool,
) -> Result<Manifest, Error> {
    let config = json!({"split": "held_out"});
    let mut run = StageRun::new(RECONSTRUCT_STAGE, tool(), out, &config, ShardSpec::single())?;
    let stage = run.upstream("vqgan", vqgan_uri)?;
    let pairs = run.upstream("pairs", pairs_uri)?;
    if let Some(existing) = run.begin(force)? {
        return Ok(existing);
    }
    let device = nn::backend::device(device).map_err(|e| Error::Usage(e.to_string()))?;
    let (model_config, model) = load_vqgan(&stage, &device)?;
    let (train_set, held_out) = crate::data::load(&pairs, model_config.image_size)?;
    let images = if held_out.is_empty() {
        &train_set
    } else {
        &held_out
    };
    let quality = eval::evaluate(&model, images, &device)?;
    let grid = eval::reconstruction_grid(&model, images, &device)?;
    let artifacts =
        vec![run.write_artifact("reconstructions.png", "image/png", Bytes::from(grid), None)?];
    let mut metrics = Map::new();
    metrics.insert("psnr_db".into(), json!(quality.psnr_db));
    metrics.insert("ssim".into(), json!(quality.ssim));
    metrics.insert("codebook_usage".into(), json!(quality.codebook_usage));
    metrics.insert("codebook_perplexity".into(), json!(quality.perplexity));
    metrics.insert("images".into(), json!(images.len()));
    Ok(run.publish(artifacts, metrics)?)
}

/// Token grids -> `[n, 3, size, size]` pixels in [0, 1].
pub fn decode_tokens(
    model: &VitVqgan,
    tokens: &[Vec<u16>],
    device: &Device,
) -> Result<Vec<Vec<f32>>, Error> {
    let per_grid = model.grid * model.grid;
    let codebook = model.quantizer.codebook_size();
    let mut flat = Vec::with_capacity(tokens.len() * per_grid);
    for (i, grid) in tokens.iter().enumerate() {
        if grid.len() != per_grid {
            return Err(Error::Data(format!(
                "token list {i} has {} tokens, the model's grid needs {per_grid}",
                grid.len()
            )));
        }
        if let Some(bad) = grid.iter().find(|t| usize::from(**t) >= codebook) {
            return Err(Error::Data(format!(
                "token list {i}: token {bad} is outside the codebook of {codebook}"
            )));
        }
        flat.extend(grid.iter().map(|t| i32::from(*t)));
    }
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let indices =
        Tensor::<1, Int>::from_data(flat.as_slice(), device).reshape([tokens.len(), per_grid]);
    let images = floats(model.decode(indices).clamp(0.0, 1.0))?;
    let per_image = images.len() / tokens.len();
    Ok(images.chunks(per_image).map(|c| c.to_vec()).collect())
}

/// `vqgan decode`: token rows -> `<out>/<key>.png`. Returns the files written.
pub fn decode_to_pngs(
    vqgan_uri: &str,
    rows: &[TokenRow],
    out: &str,
    device: &str,
) -> Result<Vec<String>, Error> {
    let device = nn::backend::device(device).map_err(|e| Error::Usage(e.to_string()))?;
    let (stage, _) = Upstream::read(vqgan_uri)?;
    let (config, model) = load_vqgan(&stage, &device)?;
    let out = Location::parse(out)?;
    let mut written = Vec::new();
    for chunk in rows.chunks(32) {
        let grids: Vec<Vec<u16>> = chunk.iter().map(|r| r.tokens.clone()).collect();
        for (row, pixels) in chunk.iter().zip(decode_tokens(&model, &grids, &device)?) {
            let png = eval::png_bytes(&eval::to_rgb(&pixels, config.image_size))?;
            let safe: String = row
                .key
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let location = out.join(&format!("{safe}.png"));
            location.put(Bytes::from(png))?;
            written.push(location.uri());
        }
    }
    Ok(written)
}
