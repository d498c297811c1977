//! `ingest synth`: the embedded default data. Captioned flat shapes on a mid-gray background,
//! deterministic for a seed, in img2dataset's "files" layout (`pairs/KEY.png` + `KEY.txt`),
//! plus a C4-style text corpus (`text/*.json.gz`). Small enough for CI, structured enough that
//! every later stage can show it learned something (colour, shape and position are checkable).

use std::io::Write;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::{Error, RunOptions, Tally, tool};
use manifests::{Artifact, Manifest, StageRun};

pub const STAGE: &str = "ingest.synth";

pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 220, 40]),
    ("purple", [140, 60, 190]),
    ("orange", [245, 140, 30]),
    ("white", [250, 250, 250]),
    ("black", [15, 15, 15]),
];
/// Row-major 3x3 grid, the phrase used in captions.
pub const POSITIONS: [&str; 9] = [
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
];
pub const BACKGROUND: [u8; 3] = [128, 128, 128];

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

/// One object in a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: usize,
    pub color: usize,
    pub position: usize,
}

pub fn describe(object: &Object) -> String {
    format!(
        "a {} {} {}",
        COLORS[object.color].0, SHAPES[object.shape], POSITIONS[object.position]
    )
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

fn inside(shape: usize, dx: f32, dy: f32, r: f32) -> bool {
    match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        _ => {
            // Upward triangle: apex at (0, -r), base at y = 0.8 r from -r to r.
            let t = (dy + r) / (1.8 * r);
            (0.0..=1.0).contains(&t) && dx.abs() <= t * r
        }
    }
}

/// Draws the scene with 4x4 supersampling, so edges are anti-aliased.
pub fn render(objects: &[Object], size: u32, jitter: &[(f32, f32, f32)]) -> RgbImage {
    let mut image = RgbImage::from_pixel(size, size, Rgb(BACKGROUND));
    let s = size as f32;
    for (object, &(jx, jy, jr)) in objects.iter().zip(jitter) {
        let (row, col) = ((object.position / 3) as f32, (object.position % 3) as f32);
        let (cx, cy) = ((col + 0.5 + jx) * s / 3.0, (row + 0.5 + jy) * s / 3.0);
        let r = s * 0.15 * jr;
        let color = COLORS[object.color].1;
        let (x0, x1) = (
            ((cx - r - 1.0).max(0.0)) as u32,
            ((cx + r + 1.0).min(s - 1.0)) as u32,
        );
        let (y0, y1) = (
            ((cy - r - 1.0).max(0.0)) as u32,
            ((cy + r + 1.0).min(s - 1.0)) as u32,
        );
        for y in y0..=y1 {
            for x in x0..=x1 {
                let mut covered = 0u32;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let px = x as f32 + (sx as f32 + 0.5) / 4.0;
                        let py = y as f32 + (sy as f32 + 0.5) / 4.0;
                        covered += u32::from(inside(object.shape, px - cx, py - cy, r));
                    }
                }
                if covered > 0 {
                    let alpha = covered as f32 / 16.0;
                    let pixel = image.get_pixel_mut(x, y);
                    for (channel, target) in pixel.0.iter_mut().zip(color) {
                        *channel =
                            (*channel as f32 * (1.0 - alpha) + target as f32 * alpha).round() as u8;
                    }
                }
            }
        }
    }
    image
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
