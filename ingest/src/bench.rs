//! `ingest bench`: per-core throughput of the per-image work (decode -> crop -> resize ->
//! encode) against Pillow doing the same steps on the same photos, in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;
use crate::process::{ImageConfig, RawSample, process};

/// CPU seconds this process has used, all threads (what Python's `time.process_time()` reads
/// on the Pillow side). Threads a decoder starts count, so one loop is one core's worth.
#[cfg(unix)]
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[cfg(not(unix))]
fn process_cpu_seconds() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
}

/// Images per CPU-second (all of the process's threads), over the `*.jpg` files of `photos`,
/// for at least `seconds` of work.
pub fn ours(photos: &Path, size: u32, seconds: f64) -> Result<f64, Error> {
    let files = read_photos(photos)?;
    let mut config = ImageConfig::with_size(size);
    config.min_source_size = 1;
    config.max_aspect_ratio = f32::MAX;
    let (mut done, started) = (0usize, process_cpu_seconds());
    while process_cpu_seconds() - started < seconds {
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
    Ok(done as f64 / (process_cpu_seconds() - started))
}

pub fn read_photos(photos: &Path) -> Result<Vec<Vec<u8>>, Error> {
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
