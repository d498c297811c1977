//! `ingest bench`: per-core throughput of the per-image work (decode -> crop -> resize ->
//! encode) against Pillow doing the same steps on the same photos, in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::Error;
use crate::process::{ImageConfig, RawSample, process};

/// Images per CPU-second on one thread, over the `*.jpg` files of `photos`, for at least
/// `seconds` of work.
pub fn ours(photos: &Path, size: u32, seconds: f64) -> Result<f64, Error> {
    let files = read_photos(photos)?;
    let mut config = ImageConfig::with_size(size);
    config.min_source_size = 1;
    config.max_aspect_ratio = f32::MAX;
    let (mut done, started) = (0usize, Instant::now());
    while started.elapsed().as_secs_f64() < seconds {
        for bytes in &files {
            let sample = RawSample {
                key: String::new(),
                source: String::new(),
                image: bytes,
                caption: Some(b"x"),
                metadata: None,
            };
            process(sample, &config)
                .map_err(|reason| Error::Io(format!("benchmark photo failed: {reason}")))?;
        }
        done += files.len();
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

fn read_photos(photos: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(photos)
        .map_err(|e| Error::Io(format!("{}: {e}", photos.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "jpg"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no .jpg photos (run `make bench-photos`)",
            photos.display()
        )));
    }
    paths
        .iter()
        .map(|path| std::fs::read(path).map_err(|e| Error::Io(format!("{}: {e}", path.display()))))
        .collect()
}

/// Runs `bench/ingest_pillow.py` with `python` on the same photos; images per CPU-second.
pub fn pillow(
    python: &Path,
    script: &Path,
    photos: &Path,
    size: u32,
    seconds: f64,
    draft: bool,
) -> Result<f64, Error> {
    let mut command = Command::new(python);
    command.arg(script).arg(photos).args([
        "--size",
        &size.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]);
    if draft {
        command.arg("--draft");
    }
    let output = command
        .output()
        .map_err(|e| Error::Io(format!("running {}: {e}", python.display())))?;
    if !output.status.success() {
        return Err(Error::Io(format!(
            "Pillow benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let line: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::Io(format!("Pillow benchmark printed no JSON: {e}")))?;
    line["images_per_second"]
        .as_f64()
        .ok_or_else(|| Error::Io("Pillow benchmark: no images_per_second".into()))
}
