//! `ingest synth`: the embedded default data. Captioned flat shapes on a mid-gray background,
//! deterministic for a seed, in img2dataset's "files" layout (`pairs/KEY.png` + `KEY.txt`),
//! plus a C4-style text corpus (`text/*.json.gz`). Small enough for CI, structured enough that
//! every later stage can show it learned something (colour, shape and position are checkable).

use std::io::Write;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::{Error, RunOptions, Tally, tool};
use manifests::{Artifact, Manifest, StageRun};
use shapes::{COLORS, Object, POSITIONS, SHAPES, describe, render};

pub const STAGE: &str = "ingest.synth";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    pub images: usize,
    pub size: u32,
    /// Share of images with a second object.
    pub two_object_fraction: f64,
    /// Documents in the text corpus.
    pub documents: usize,
    pub seed: u64,
}

impl SynthConfig {
    pub fn preset(name: &str) -> Result<SynthConfig, Error> {
        match name {
            "tiny" => Ok(SynthConfig {
                images: 3000,
                size: 64,
                two_object_fraction: 0.2,
                documents: 3000,
                seed: 0,
            }),
            "default" => Ok(SynthConfig {
                images: 20000,
                size: 256,
                two_object_fraction: 0.2,
                documents: 20000,
                seed: 0,
            }),
            other => Err(Error::Usage(format!(
                "unknown preset '{other}' for ingest synth (tiny, default)"
            ))),
        }
    }
}

/// Canonical caption first; paraphrases keep the text encoder honest without hiding the facts.
fn caption(objects: &[Object], rng: &mut ChaCha8Rng) -> String {
    let parts: Vec<String> = objects.iter().map(describe).collect();
    let joined = parts.join(" and ");
    match rng.random_range(0..10) {
        0 => format!("there is {joined}"),
        1 => format!("a picture of {joined}"),
        2 => format!("{joined} on a gray background"),
        _ => joined,
    }
}

/// Sample `index` of the data set: its objects, caption and picture. Each sample has its own
/// RNG stream, so the data is the same however it is split across threads or jobs.
pub fn sample(config: &SynthConfig, index: usize) -> (Vec<Object>, String, RgbImage) {
    let mut rng =
        ChaCha8Rng::seed_from_u64(config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index as u64);
    let first = Object {
        shape: rng.random_range(0..SHAPES.len()),
        color: rng.random_range(0..COLORS.len()),
        position: rng.random_range(0..POSITIONS.len()),
    };
    let mut objects = vec![first];
    if rng.random_bool(config.two_object_fraction.clamp(0.0, 1.0)) {
        let mut position = rng.random_range(0..POSITIONS.len() - 1);
        if position >= first.position {
            position += 1;
        }
        objects.push(Object {
            shape: rng.random_range(0..SHAPES.len()),
            color: rng.random_range(0..COLORS.len()),
            position,
        });
    }
    let jitter: Vec<(f32, f32, f32)> = objects
        .iter()
        .map(|_| {
            (
                rng.random_range(-0.06..0.06),
                rng.random_range(-0.06..0.06),
                rng.random_range(0.9..1.1),
            )
        })
        .collect();
    let text = caption(&objects, &mut rng);
    let image = render(&objects, config.size, &jitter);
    (objects, text, image)
}

fn document(config: &SynthConfig, index: usize) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(
        config.seed.wrapping_add(0xD0C5) ^ (index as u64).rotate_left(17),
    );
    let pick = |rng: &mut ChaCha8Rng| Object {
        shape: rng.random_range(0..SHAPES.len()),
        color: rng.random_range(0..COLORS.len()),
        position: rng.random_range(0..POSITIONS.len()),
    };
    let (a, b) = (pick(&mut rng), pick(&mut rng));
    let (ca, sa, pa) = (COLORS[a.color].0, SHAPES[a.shape], POSITIONS[a.position]);
    let (cb, sb, pb) = (COLORS[b.color].0, SHAPES[b.shape], POSITIONS[b.position]);
    match rng.random_range(0..4) {
        0 => format!("The {ca} {sa} is {pa}. A {cb} {sb} is {pb}."),
        1 => format!("Look {pa}: you will find a {ca} {sa}. The {sb} {pb} is {cb}."),
        2 => format!("In this picture a {ca} {sa} sits {pa}, and a {cb} {sb} sits {pb}."),
        _ => format!("A {ca} {sa} {pa}. Nothing else is {pb} except a {cb} {sb}."),
    }
}

pub fn synth(config: &SynthConfig, options: &RunOptions) -> Result<Manifest, Error> {
    let run = StageRun::new(STAGE, tool(), &options.out, config, options.shard)?;
    if !run.shard().is_single() {
        return Err(Error::Usage("ingest synth runs as one job".into()));
    }
    if let Some(existing) = run.begin(options.force)? {
        return Ok(existing);
    }
    let written: Result<Vec<Vec<Artifact>>, Error> = (0..config.images)
        .into_par_iter()
        .map(|index| {
            let (_, text, image) = sample(config, index);
            let mut png = Vec::new();
            image
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| Error::Io(format!("encoding synthetic image {index}: {e}")))?;
            let key = format!("pairs/{index:09}");
            Ok(vec![
                run.write_artifact(&format!("{key}.png"), "image", Bytes::from(png), None)?,
                run.write_artifact(&format!("{key}.txt"), "caption", Bytes::from(text), None)?,
            ])
        })
        .collect();
    let mut artifacts: Vec<Artifact> = written?.into_iter().flatten().collect();

    let mut corpus = GzEncoder::new(Vec::new(), Compression::default());
    let mut captions = 0;
    for index in 0..config.documents {
        // Half the corpus is captions, so the tokenizer sees the caption vocabulary in context.
        let text = if index % 2 == 0 {
            captions += 1;
            sample(config, index).1
        } else {
            document(config, index)
        };
        let line = json!({"text": text, "timestamp": "2026-01-01T00:00:00Z", "url": format!("synth://doc/{index}")});
        writeln!(corpus, "{line}").map_err(|e| Error::Io(e.to_string()))?;
    }
    let corpus = corpus.finish().map_err(|e| Error::Io(e.to_string()))?;
    artifacts.push(run.write_artifact(
        "text/c4-train.00000-of-00001.json.gz",
        "text/c4-json-gz",
        Bytes::from(corpus),
        Some(config.documents as u64),
    )?);
    let mut metrics = Tally {
        rows: config.images as u64,
        ..Tally::default()
    }
    .metrics();
    metrics.insert("documents".into(), json!(config.documents));
    metrics.insert("caption_documents".into(), json!(captions));
    let manifest = run.publish(artifacts, metrics)?;
    info!(
        "ingest synth: {} images, {} documents",
        config.images, config.documents
    );
    Ok(manifest)
}
