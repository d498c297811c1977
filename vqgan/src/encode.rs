//! Using a trained tokenizer: `vqgan encode` (pairs shards -> token shards, one per pairs shard,
//! resumable shard by shard), `vqgan reconstruct` (held-out quality into a manifest) and
//! `vqgan decode` (tokens -> PNGs).

use std::time::Instant;

use burn::tensor::{Device, Int, Tensor};
use bytes::Bytes;
use manifests::shards::{add_rejected, add_rejected_note, pairs, tokens};
use manifests::{Location, Manifest, ShardSpec, StageRun, Upstream, job_range};
use models::load_vqgan;
use models::vqgan::{VitVqgan, VitVqganConfig, decode_tokens};
use nn::images::{self, png_bytes, to_rgb};
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use tracing::info;

use crate::config::HELD_OUT_LIMIT;
use crate::eval;
use crate::train::held_out_images;
use crate::{Error, tool};

pub const ENCODE_STAGE: &str = "vqgan.encode";
pub const RECONSTRUCT_STAGE: &str = "vqgan.reconstruct";

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

/// Where `vqgan encode` and `vqgan reconstruct` read and write.
pub struct TokenizerRun<'a> {
    /// The `vqgan train` or `vqgan finetune-decoder` manifest.
    pub vqgan: &'a str,
    /// The `ingest pairs` manifest.
    pub pairs: &'a str,
    pub out: &'a str,
    pub device: &'a str,
    pub force: bool,
}

/// A run that reads a trained tokenizer and pairs, begun: its inputs recorded, then the pairs,
/// the model and its device, or the finished manifest when nothing changed.
#[allow(clippy::type_complexity)]
fn begin(
    run: &mut StageRun,
    args: &TokenizerRun,
) -> Result<Result<(Upstream, VitVqganConfig, VitVqgan, Device), Manifest>, Error> {
    let stage = run.upstream("vqgan", args.vqgan)?;
    let pairs = run.upstream("pairs", args.pairs)?;
    if let Some(existing) = run.begin(args.force)? {
        return Ok(Err(existing));
    }
    let device = nn::backend::device(args.device).map_err(|e| Error::Usage(e.to_string()))?;
    let (model_config, model) = load_vqgan(&stage, &device)?;
    Ok(Ok((pairs, model_config, model, device)))
}

/// `vqgan encode`: one token shard per pairs shard. A killed run keeps the shards it finished.
/// Job `shard.index` of a batch array of `shard.count` encodes its contiguous slice of the
/// pairs shards and writes a partial manifest; `manifests merge` joins the jobs' into the
/// manifest one job over every shard writes.
pub fn encode(
    config: &EncodeConfig,
    args: &TokenizerRun,
    shard: ShardSpec,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let mut run = StageRun::new(ENCODE_STAGE, tool(), args.out, config, shard)?;
    let (pairs, model_config, model, device) = match begin(&mut run, args)? {
        Ok(begun) => begun,
        Err(existing) => return Ok(existing),
    };
    let (size, grid) = (model_config.image_size, model_config.grid());
    let codebook_size = model_config.quantizer.codebook_size;
    let every_shard = pairs::shards(&pairs);
    let range = job_range(every_shard.len(), shard);
    if !shard.is_single() {
        info!(
            "job {} of {}: pairs shards {}..{} of {}",
            shard.index,
            shard.count,
            range.start,
            range.end,
            every_shard.len()
        );
    }
    let shards = &every_shard[range];
    let progress = nn::progress::bar(
        shards.len() as u64,
        0,
        "shards",
        "vqgan encode",
        nn::progress::bars_shown(),
    );
    let (mut artifacts, mut rows) = (Vec::new(), 0u64);
    let mut rejected = images::Rejected::new();
    for &artifact in shards {
        let name = artifact
            .uri
            .rsplit('/')
            .next()
            .unwrap_or(&artifact.uri)
            .replace("pairs", "tokens");
        let relative = format!("tokens/{name}");
        if let Some(done) = run.finished_artifact_noted(&relative)? {
            rows += done.artifact.rows.unwrap_or(0);
            // Runs before the image policy noted a bare count of images that did not decode.
            match done.note["rejected"].as_u64() {
                Some(count) => *rejected.entry("undecodable".into()).or_default() += count,
                None => add_rejected_note(&mut rejected, &done.note),
            }
            artifacts.push(done.artifact);
            progress.inc(1);
            continue;
        }
        let shard = images::shard_images(&pairs, artifact, size)?;
        let tokens = encode_pixels(&model, &shard.pixels, size, config.batch_size, &device)?;
        let token_rows: Vec<tokens::TokenRow> = shard
            .keys
            .into_iter()
            .zip(shard.captions)
            .zip(tokens)
            .map(|((key, caption), tokens)| tokens::TokenRow {
                key,
                caption,
                tokens,
            })
            .collect();
        let target = run.out().join(&relative).uri();
        let bytes = tokens::to_parquet(&target, &token_rows, grid, codebook_size)?;
        rows += token_rows.len() as u64;
        add_rejected(&mut rejected, &shard.rejected);
        artifacts.push(run.write_artifact_noted(
            &relative,
            tokens::KIND,
            bytes,
            Some(token_rows.len() as u64),
            json!({"rejected": shard.rejected}),
        )?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    // A job of an array with more jobs than shards has none to encode: its part, of no rows,
    // lets the array merge.
    if rows == 0 && !shards.is_empty() {
        // Else an empty stage is published, and only `train parti` would find out.
        return Err(Error::Data(format!(
            "{}: no image of it encodes at the tokenizer's {size} px (rejected: {}): are these \
             the pairs of this tokenizer's size?",
            pairs.location.uri(),
            json!(rejected)
        )));
    }
    let mut metrics = Map::new();
    metrics.insert("rows".into(), json!(rows));
    metrics.insert("rejected".into(), json!(rejected));
    metrics.insert("grid".into(), json!(grid));
    metrics.insert("codebook_size".into(), json!(codebook_size));
    metrics.insert("image_size".into(), json!(size));
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    info!(
        "{rows} images encoded, {} rejected",
        rejected.values().sum::<u64>()
    );
    Ok(run.publish(artifacts, metrics)?)
}

/// `vqgan reconstruct`: held-out images through the tokenizer; PSNR/SSIM/usage into a manifest
/// and a side-by-side grid PNG.
pub fn reconstruct(args: &TokenizerRun) -> Result<Manifest, Error> {
    let config = json!({"split": "held_out", "images": HELD_OUT_LIMIT});
    let mut run = StageRun::new(
        RECONSTRUCT_STAGE,
        tool(),
        args.out,
        &config,
        ShardSpec::single(),
    )?;
    let begun = begin(&mut run, args)?;
    let (pairs, model_config, model, device) = match begun {
        Err(existing) => return Ok(existing),
        Ok(begun) => begun,
    };
    let (images, stand_in) = held_out_images(&pairs, model_config.image_size)?;
    let quality = eval::evaluate(&model, &images, &device)?;
    let grid = eval::reconstruction_grid(&model, &images, &device)?;
    let artifacts =
        vec![run.write_artifact("reconstructions.png", "image/png", Bytes::from(grid), None)?];
    let mut metrics = Map::new();
    metrics.insert("psnr_db".into(), json!(quality.psnr_db));
    metrics.insert("ssim".into(), json!(quality.ssim));
    metrics.insert("codebook_usage".into(), json!(quality.codebook_usage));
    metrics.insert("codebook_perplexity".into(), json!(quality.perplexity));
    metrics.insert("images".into(), json!(images.len()));
    metrics.insert("held_out_stood_in".into(), json!(stand_in));
    metrics.insert("rejected".into(), json!(images.rejected));
    Ok(run.publish(artifacts, metrics)?)
}

/// `vqgan decode`: token rows -> `<out>/<key>.png` (characters a file name cannot hold become
/// `_`; a name another row took already, or an empty key, gets `-<place in rows>` until it is
/// free). Returns the files written.
pub fn decode_to_pngs(
    vqgan_uri: &str,
    rows: &[tokens::TokenRow],
    out: &str,
    device: &str,
) -> Result<Vec<String>, Error> {
    let device = nn::backend::device(device).map_err(|e| Error::Usage(e.to_string()))?;
    let (stage, _) = Upstream::read(vqgan_uri)?;
    let (config, model) = load_vqgan(&stage, &device)?;
    let out = Location::parse(out)?;
    let mut written = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (chunk_index, chunk) in rows.chunks(32).enumerate() {
        let grids: Vec<Vec<u16>> = chunk.iter().map(|r| r.tokens.clone()).collect();
        let pictures = decode_tokens(&model, &grids, &device)?;
        for (offset, (row, pixels)) in chunk.iter().zip(pictures).enumerate() {
            let place = chunk_index * 32 + offset;
            let png = png_bytes(&to_rgb(&pixels, config.image_size))?;
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
            // Keys that differ only where a file name cannot (`a/b`, `a b`), or that are empty,
            // would overwrite one another: a taken name gets the row's place in `rows`, again
            // while another row's key already took that.
            let mut stem = safe;
            while stem.is_empty() || !names.insert(stem.clone()) {
                stem = format!("{stem}-{place}");
            }
            let location = out.join(&format!("{stem}.png"));
            location.put(Bytes::from(png))?;
            written.push(location.uri());
        }
    }
    Ok(written)
}
