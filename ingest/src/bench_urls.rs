//! `ingest bench-urls`: `ingest pairs` against img2dataset over the same URL list, served from
//! loopback by this process, in the same run: images per second, and per CPU-second of the
//! downloader's processes (children included, so img2dataset's worker processes count).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use crate::Error;

/// One side's run: images written, wall seconds, CPU seconds of its processes.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub images: u64,
    pub wall: f64,
    pub cpu: f64,
}

impl Measured {
    pub fn per_second(&self) -> f64 {
        self.images as f64 / self.wall
    }

    pub fn per_cpu_second(&self) -> f64 {
        self.images as f64 / self.cpu
    }
}

/// CPU seconds of every finished child process (and their waited-for children).
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Serves `/N.jpg` (photo N modulo the set, with N's bytes after the end-of-image marker so
/// every URL is a distinct file) with keep-alive, one thread per connection.
pub fn serve_photos(photos: Vec<Vec<u8>>) -> Result<u16, Error> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Io(format!("bench server: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Io(format!("bench server: {e}")))?
        .port();
    let photos = Arc::new(photos);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let photos = photos.clone();
            std::thread::spawn(move || serve_connection(stream, &photos));
        }
    });
    Ok(port)
}

fn serve_connection(mut stream: TcpStream, photos: &[Vec<u8>]) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    loop {
        let mut request = String::new();
        match reader.read_line(&mut request) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = request.contains("HTTP/1.0");
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" || line == "\n" => break,
                Ok(_) => {
                    if line.to_ascii_lowercase().starts_with("connection: close") {
                        close = true;
                    }
                }
            }
        }
        let number = request
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.strip_prefix('/'))
            .and_then(|path| path.strip_suffix(".jpg"))
            .and_then(|n| n.parse::<usize>().ok());
        let (status, body) = match number {
            Some(n) if !photos.is_empty() => {
                let mut body = photos[n % photos.len()].clone();
                body.extend_from_slice(&(n as u64).to_le_bytes());
                ("200 OK", body)
            }
            _ => ("404 Not Found", Vec::new()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if stream.write_all(head.as_bytes()).is_err() || stream.write_all(&body).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

/// Writes `url,caption` rows for `/0.jpg`..`/{count-1}.jpg` on `port`.
pub fn write_url_list(path: &Path, port: u16, count: usize) -> Result<(), Error> {
    let mut csv = String::from("url,caption\n");
    for n in 0..count {
        csv.push_str(&format!(
            "http://127.0.0.1:{port}/{n}.jpg,photo number {n}\n"
        ));
    }
    std::fs::write(path, csv).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}

fn timed(command: &mut Command) -> Result<(f64, f64), Error> {
    let (cpu, wall) = (children_cpu_seconds(), Instant::now());
    let output = command
        .output()
        .map_err(|e| Error::Io(format!("running {command:?}: {e}")))?;
    if !output.status.success() {
        return Err(Error::Io(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok((wall.elapsed().as_secs_f64(), children_cpu_seconds() - cpu))
}

/// `ingest pairs` (this executable) over the list.
pub fn ours(list: &Path, out: &Path, size: u32, concurrency: usize) -> Result<Measured, Error> {
    let exe = std::env::current_exe().map_err(|e| Error::Io(e.to_string()))?;
    let concurrency = concurrency.to_string();
    let (wall, cpu) = timed(Command::new(exe).args([
        "pairs".as_ref(),
        "--input".as_ref(),
        list.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--size".as_ref(),
        size.to_string().as_ref(),
        "--concurrency".as_ref(),
        concurrency.as_ref(),
        "--per-host-concurrency".as_ref(),
        concurrency.as_ref(),
    ]))?;
    let (manifest, _) = manifests::Manifest::read(&manifests::Location::parse(
        &out.join(manifests::MANIFEST_FILE).to_string_lossy(),
    )?)?;
    Ok(Measured {
        images: manifest.metric_u64("rows").unwrap_or(0),
        wall,
        cpu,
    })
}

/// img2dataset (`img2dataset` beside `python`) over the list, writing parquet at the same size
/// and resize mode.
pub fn img2dataset(
    python: &Path,
    list: &Path,
    out: &Path,
    size: u32,
    processes: usize,
    threads: usize,
) -> Result<Measured, Error> {
    let script = python.with_file_name("img2dataset");
    // Albumentations (an img2dataset dependency) checks PyPI for updates on import otherwise.
    let mut command = Command::new(&script);
    command.env("NO_ALBUMENTATIONS_UPDATE", "1");
    let (wall, cpu) = timed(command.args([
        "--url_list".as_ref(),
        list.as_os_str(),
        "--input_format".as_ref(),
        "csv".as_ref(),
        "--url_col".as_ref(),
        "url".as_ref(),
        "--caption_col".as_ref(),
        "caption".as_ref(),
        "--output_format".as_ref(),
        "parquet".as_ref(),
        "--output_folder".as_ref(),
        out.as_os_str(),
        "--image_size".as_ref(),
        size.to_string().as_ref(),
        "--resize_mode".as_ref(),
        "center_crop".as_ref(),
        "--encode_quality".as_ref(),
        "95".as_ref(),
        "--processes_count".as_ref(),
        processes.to_string().as_ref(),
        "--thread_count".as_ref(),
        threads.to_string().as_ref(),
        "--number_sample_per_shard".as_ref(),
        "1000".as_ref(),
        "--retries".as_ref(),
        "0".as_ref(),
    ]))?;
    let mut images = 0;
    let listed =
        std::fs::read_dir(out).map_err(|e| Error::Io(format!("{}: {e}", out.display())))?;
    for entry in listed.flatten() {
        let path: PathBuf = entry.path();
        if path.to_string_lossy().ends_with("_stats.json") {
            let stats: serde_json::Value = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default();
            images += stats["successes"].as_u64().unwrap_or(0);
        }
    }
    Ok(Measured { images, wall, cpu })
}
