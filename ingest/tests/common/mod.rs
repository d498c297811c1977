#![allow(dead_code)]
use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use ingest::process::Row;
use ingest::shard::{TextRow, pairs_from_parquet, text_from_parquet};
use manifests::{Manifest, Upstream};

/// A picture with a distinct colour per seed, so every test image has unique bytes.
pub fn picture(width: u32, height: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([seed, (x % 256) as u8, (y % 256) as u8])
    })
}

pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

pub fn png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(
        &DynamicImage::ImageRgb8(picture(width, height, seed)),
        ImageFormat::Png,
    )
}

pub fn jpeg(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(
        &DynamicImage::ImageRgb8(picture(width, height, seed)),
        ImageFormat::Jpeg,
    )
}

pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Every row of a pairs manifest, read through digest-checked artifacts.
pub fn pairs_rows(out: &str) -> (Manifest, Vec<Row>) {
    let (upstream, _) = Upstream::read(out).unwrap();
    let mut rows = Vec::new();
    for artifact in upstream.artifacts_of_kind("parquet/pairs") {
        let bytes = upstream.read_artifact(artifact).unwrap();
        rows.extend(pairs_from_parquet(&artifact.uri, bytes).unwrap());
    }
    (upstream.manifest, rows)
}

pub fn text_rows(out: &str) -> (Manifest, Vec<TextRow>) {
    let (upstream, _) = Upstream::read(out).unwrap();
    let mut rows = Vec::new();
    for artifact in upstream.artifacts_of_kind("parquet/text") {
        let bytes = upstream.read_artifact(artifact).unwrap();
        rows.extend(text_from_parquet(&artifact.uri, bytes).unwrap());
    }
    (upstream.manifest, rows)
}

pub fn ingest(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

pub fn rejected(manifest: &Manifest) -> serde_json::Value {
    manifest.metrics["rejected"].clone()
}

pub fn sorted_keys(rows: &[Row]) -> Vec<String> {
    let mut keys: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    keys
}
