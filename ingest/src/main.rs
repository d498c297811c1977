//! `ingest`: the first stage of the parti pipeline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use ingest::RunOptions;
use ingest::download::DownloadOptions;
use ingest::pairs::{PairsConfig, ingest_pairs};
use ingest::process::{OutputFormat, ResizeMode};
use ingest::sources::{CocoCaptions, InputFormat};
use ingest::synth::{SynthConfig, synth};
use ingest::text::{TextConfig, ingest_text};
use manifests::cli::{JobArgs, StageArgs};
use manifests::config::layered;
use serde_json::json;

#[derive(Parser)]
#[command(
    version,
    about = "Image-text pairs and text corpora into Parquet shards.",
    long_about = "\
Image-text pairs and text corpora into Parquet shards, with a manifest at OUT/manifest.json.

Inputs and outputs may be local paths or bucket URIs (s3://, gs://, az://); credentials come \
from the environment. A rerun with unchanged inputs and config is skipped; a killed run resumes \
where it stopped. For a cloud batch array, give each job --shard-index/--num-shards (or let \
JOB_COMPLETION_INDEX / AWS_BATCH_JOB_ARRAY_INDEX / CLOUD_RUN_TASK_INDEX set them) and join the \
jobs' manifests with `manifests merge`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Image-text pairs (folder, COCO, CSV/TSV/JSONL, img2dataset parquet, webdataset tars).
    Pairs(Box<PairsArgs>),
    /// Text corpora (C4 json.gz, JSONL, plain text) for text-encoder pretraining.
    Text(TextArgs),
    /// Remove duplicate images across the jobs of a batch array (run after `manifests merge`).
    Dedup(DedupArgs),
    /// Generate the embedded default data set (captioned shapes and a small text corpus).
    Synth(SynthArgs),
    /// Images per second per core against Pillow on the same photos (see `make bench`).
    Bench(BenchArgs),
    /// `ingest pairs` against img2dataset over one URL list served from loopback.
    BenchUrls(BenchUrlsArgs),
}

#[derive(Args)]
struct BenchUrlsArgs {
    /// Folder of .jpg photos; URL N serves photo N modulo their number (as distinct files).
    #[arg(long)]
    photos: std::path::PathBuf,
    /// URLs in the list.
    #[arg(long, default_value_t = 2000)]
    count: usize,
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Python whose environment has img2dataset (bench/.venv/bin/python).
    #[arg(long)]
    python: Option<std::path::PathBuf>,
    /// img2dataset worker processes (one per core).
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// img2dataset threads per process; ours gets processes x threads downloads in flight.
    #[arg(long, default_value_t = 32)]
    threads: usize,
    /// Work folder (emptied first).
    #[arg(long, default_value = "bench/.cache/urls")]
    work: std::path::PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// Folders of .jpg photos, one row of the table each.
    #[arg(long, required = true)]
    photos: Vec<std::path::PathBuf>,
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Seconds of work per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Python with Pillow for the peer measurement (bench/.venv/bin/python).
    #[arg(long)]
    python: Option<std::path::PathBuf>,
    #[arg(long, default_value = "bench/ingest_pillow.py")]
    pillow_script: std::path::PathBuf,
}

#[derive(Args)]
struct PairsArgs {
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    job: JobArgs,
    /// Input file or folder (local path or bucket URI).
    #[arg(long)]
    input: Option<String>,
    #[arg(long, value_enum)]
    format: Option<InputFormat>,
    /// Folder that image paths in COCO/CSV/TSV/JSONL are relative to.
    #[arg(long)]
    image_root: Option<String>,
    #[arg(long, value_enum)]
    coco_captions: Option<CocoCaptions>,
    /// Image path column or JSON field (0-based index with --no-header).
    #[arg(long)]
    image_column: Option<String>,
    /// Caption column or JSON field (0-based index with --no-header).
    #[arg(long)]
    caption_column: Option<String>,
    /// CSV/TSV files have no header row (CC3M: caption=0 url=1; CC12M: url=0 caption=1).
    #[arg(long)]
    no_header: bool,
    /// Output side in pixels (256 default; 64 in the tiny preset).
    #[arg(long)]
    size: Option<u32>,
    #[arg(long, value_enum)]
    resize_mode: Option<ResizeMode>,
    #[arg(long)]
    min_source_size: Option<u32>,
    /// Sources longer than this many times their width (or vice versa) are rejected; a
    /// finite number, at least 1.
    #[arg(long, value_parser = aspect_ratio)]
    max_aspect_ratio: Option<f32>,
    /// Images declaring more pixels than this are refused before decoding.
    #[arg(long)]
    max_source_pixels: Option<u64>,
    #[arg(long)]
    max_caption_chars: Option<usize>,
    #[arg(long, value_enum)]
    output_format: Option<OutputFormat>,
    #[arg(long)]
    jpeg_quality: Option<u8>,
    /// Samples per output shard.
    #[arg(long)]
    shard_rows: Option<usize>,
    #[command(flatten)]
    download: DownloadArgs,
}

/// Images named by http(s) URL in the input list are downloaded.
#[derive(Args)]
struct DownloadArgs {
    /// Column or JSON field with image URLs (default: --image-column, else `url`; for COCO,
    /// e.g. `coco_url`).
    #[arg(long)]
    url_column: Option<String>,
    /// Downloads in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Downloads in flight to one host at once.
    #[arg(long, default_value_t = 16)]
    per_host_concurrency: usize,
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// Longest wait for the next bytes of a response.
    #[arg(long, default_value_t = 10_000)]
    read_timeout_ms: u64,
    /// Longest one attempt may take in all (a slow drip ends here).
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 5)]
    max_redirects: usize,
    /// Further attempts after a transient failure (timeout, dns, connect_failed, http_429,
    /// http_5xx, truncated), with exponential backoff or the server's Retry-After.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    #[arg(long, default_value_t = 500)]
    retry_backoff_ms: u64,
    #[arg(long)]
    user_agent: Option<String>,
    /// On a finished run: fetch again only the rows that failed for a transient reason.
    #[arg(long)]
    retry_failed: bool,
    /// Bodies longer than this are abandoned while streaming (too_large; default 32 MiB).
    #[arg(long)]
    max_download_bytes: Option<u64>,
    /// Download images whose server says `X-Robots-Tag: noai`/`noimageai` (refused by default).
    #[arg(long)]
    ignore_opt_out: bool,
    /// Local folder keeping every URL's outcome (the image as served, or a failure that would
    /// recur), read before downloading: a second stage over the same list, or a rerun, fetches
    /// nothing it has. Not part of the stage's identity; delete it to download afresh.
    #[arg(long)]
    download_cache: Option<PathBuf>,
}

impl DownloadArgs {
    fn options(&self) -> DownloadOptions {
        let defaults = DownloadOptions::default();
        DownloadOptions {
            concurrency: self.concurrency.max(1),
            per_host: self.per_host_concurrency.max(1),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            request_timeout: Duration::from_millis(self.timeout_ms),
            max_redirects: self.max_redirects,
            retries: self.retries,
            backoff: Duration::from_millis(self.retry_backoff_ms),
            user_agent: self.user_agent.clone().unwrap_or(defaults.user_agent),
            retry_failed: self.retry_failed,
            cache: self.download_cache.clone(),
        }
    }
}

#[derive(Args)]
struct TextArgs {
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    job: JobArgs,
    #[arg(long)]
    input: Option<String>,
    /// JSON field holding the document.
    #[arg(long)]
    text_field: Option<String>,
    /// Minimum document length in characters.
    #[arg(long)]
    min_chars: Option<usize>,
    /// Documents per output shard (memory holds about one shard's worth).
    #[arg(long)]
    shard_rows: Option<usize>,
}

#[derive(Args)]
struct DedupArgs {
    /// The merged `ingest pairs` manifest (or its folder).
    #[arg(long)]
    pairs: String,
    /// Output folder or bucket prefix; the manifest is written to OUT/manifest.json.
    #[arg(long, value_name = "URI")]
    out: String,
    /// Rerun even when the input is unchanged.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct SynthArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// Number of captioned images.
    #[arg(long)]
    images: Option<usize>,
    #[arg(long)]
    size: Option<u32>,
    /// Number of documents in the text corpus.
    #[arg(long)]
    documents: Option<usize>,
}

fn options(stage: &StageArgs, job: Option<&JobArgs>) -> Result<RunOptions> {
    Ok(RunOptions {
        out: stage.out.clone(),
        force: stage.force,
        shard: match job {
            Some(job) => job.shard()?,
            None => manifests::ShardSpec::single(),
        },
        progress: manifests::progress::bars_shown(),
        download: DownloadOptions::default(),
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pairs(args) => {
            args.stage.refuse_seed("ingest pairs")?;
            let preset =
                PairsConfig::preset(args.stage.preset.as_deref().unwrap_or("default"), "")?;
            let overrides = json!({
                "source": {
                    "input": args.input,
                    "format": args.format,
                    "image_root": args.image_root,
                    "coco_captions": args.coco_captions,
                    "image_column": args.image_column,
                    "caption_column": args.caption_column,
                    "has_header": if args.no_header { Some(false) } else { None },
                    "url_column": args.download.url_column,
                },
                "image": {
                    "size": args.size,
                    "resize_mode": args.resize_mode,
                    "min_source_size": args.min_source_size,
                    "max_aspect_ratio": args.max_aspect_ratio,
                    "max_source_pixels": args.max_source_pixels,
                    "max_caption_chars": args.max_caption_chars,
                    "output_format": args.output_format,
                    "jpeg_quality": args.jpeg_quality,
                },
                "shard_rows": args.shard_rows,
                "download": without_nulls(json!({
                    "max_bytes": args.download.max_download_bytes,
                    "honor_opt_out": if args.download.ignore_opt_out { Some(false) } else { None },
                })),
            });
            let config: PairsConfig = layered(&preset, args.stage.config.as_deref(), overrides)?;
            anyhow::ensure!(
                !config.source.input.is_empty(),
                "give --input (or source.input in --config)"
            );
            if let Some(cache) = &args.download.download_cache {
                anyhow::ensure!(
                    !cache.to_string_lossy().contains("://"),
                    "--download-cache {}: give a local folder (the cache is read and written \
                     next to the downloads; a bucket would put a round trip before each one)",
                    cache.display()
                );
            }
            let options = RunOptions {
                download: args.download.options(),
                ..options(&args.stage, Some(&args.job))?
            };
            let manifest = ingest_pairs(&config, &options)
                .with_context(|| format!("ingest pairs from {}", config.source.input))?;
            summary(&manifest);
        }
        Command::Text(args) => {
            args.stage.refuse_seed("ingest text")?;
            let preset = TextConfig::preset(args.stage.preset.as_deref().unwrap_or("default"), "")?;
            let overrides = json!({"input": args.input, "text_field": args.text_field,
                "min_chars": args.min_chars, "shard_rows": args.shard_rows});
            let config: TextConfig = layered(&preset, args.stage.config.as_deref(), overrides)?;
            anyhow::ensure!(
                !config.input.is_empty(),
                "give --input (or input in --config)"
            );
            let manifest = ingest_text(&config, &options(&args.stage, Some(&args.job))?)
                .with_context(|| format!("ingest text from {}", config.input))?;
            summary(&manifest);
        }
        Command::Dedup(args) => {
            let options = RunOptions {
                out: args.out.clone(),
                force: args.force,
                shard: manifests::ShardSpec::single(),
                progress: false,
                download: DownloadOptions::default(),
            };
            let manifest = ingest::dedup::dedup(&args.pairs, &options)
                .with_context(|| format!("ingest dedup of {}", args.pairs))?;
            summary(&manifest);
        }
        Command::Synth(args) => {
            let preset = SynthConfig::preset(args.stage.preset.as_deref().unwrap_or("tiny"))?;
            let overrides = json!({"images": args.images, "size": args.size, "documents": args.documents, "seed": args.stage.seed});
            let config: SynthConfig = layered(&preset, args.stage.config.as_deref(), overrides)?;
            let manifest = synth(&config, &options(&args.stage, None)?).context("ingest synth")?;
            summary(&manifest);
        }
        Command::Bench(args) => {
            println!(
                "decode -> centre crop -> {0}x{0} Lanczos -> JPEG q95 4:2:0, images per CPU-second",
                args.size
            );
            println!(
                "| photos | ours | Pillow | Pillow draft() | ours / Pillow | ours / Pillow draft() |"
            );
            println!("|---|---|---|---|---|---|");
            for photos in &args.photos {
                let ours = ingest::bench::ours(photos, args.size, args.seconds)?;
                let (plain, draft) = match &args.python {
                    Some(python) => (
                        Some(ingest::bench::pillow(
                            python,
                            &args.pillow_script,
                            photos,
                            args.size,
                            args.seconds,
                            false,
                        )?),
                        Some(ingest::bench::pillow(
                            python,
                            &args.pillow_script,
                            photos,
                            args.size,
                            args.seconds,
                            true,
                        )?),
                    ),
                    None => (None, None),
                };
                let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                let ratio =
                    |peer: Option<f64>| peer.map_or("-".into(), |p| format!("{:.2}x", ours / p));
                println!(
                    "| {} | {ours:.1} | {} | {} | {} | {} |",
                    photos.display(),
                    show(plain),
                    show(draft),
                    ratio(plain),
                    ratio(draft)
                );
            }
        }
        Command::BenchUrls(args) => bench_urls(&args)?,
    }
    Ok(())
}

fn bench_urls(args: &BenchUrlsArgs) -> Result<()> {
    use ingest::bench_urls::{Measured, img2dataset, ours, serve_photos, write_url_list};
    let photos = ingest::bench::read_photos(&args.photos)?;
    let port = serve_photos(photos)?;
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let list = args.work.join("urls.csv");
    write_url_list(&list, port, args.count)?;
    let concurrency = args.processes * args.threads;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ours = ours(&list, &args.work.join("ours"), args.size, concurrency)
        .context("ingest pairs over the URL list")?;
    let peer = match &args.python {
        Some(python) => Some(
            img2dataset(
                python,
                &list,
                &args.work.join("img2dataset"),
                args.size,
                args.processes,
                args.threads,
            )
            .context("img2dataset over the URL list")?,
        ),
        None => None,
    };
    println!(
        "{} URLs of {} on loopback, {}x{} centre crop, JPEG q95, {cores} cores; {concurrency} downloads in flight each",
        args.count,
        args.photos.display(),
        args.size,
        args.size
    );
    println!("| tool | images | wall s | CPU s | images/s | images/s per core (per CPU-second) |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, m: &Measured| {
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.1} | {:.1} |",
            m.images,
            m.wall,
            m.cpu,
            m.per_second(),
            m.per_cpu_second()
        )
    };
    row("ingest pairs", &ours);
    if let Some(peer) = &peer {
        row("img2dataset", peer);
        println!(
            "ours / img2dataset: {:.2}x images/s, {:.2}x images per CPU-second",
            ours.per_second() / peer.per_second(),
            ours.per_cpu_second() / peer.per_cpu_second()
        );
    }
    Ok(())
}

/// `--max-aspect-ratio`: a finite ratio of at least 1 (a JSON config cannot hold `inf` or
/// `NaN`, which would otherwise be dropped silently and leave the preset's value in force).
fn aspect_ratio(value: &str) -> Result<f32, String> {
    let ratio = manifests::cli::finite_f64(value)? as f32;
    if !ratio.is_finite() || ratio < 1.0 {
        return Err(format!(
            "'{value}' is not a finite ratio of at least 1 (a picture's longer side over its \
             shorter)"
        ));
    }
    Ok(ratio)
}

/// An override object without its unset fields (null when none is set), so a section the
/// preset leaves out appears only when a flag sets part of it.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(object) => {
            let kept: serde_json::Map<_, _> =
                object.into_iter().filter(|(_, v)| !v.is_null()).collect();
            if kept.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::Value::Object(kept)
            }
        }
        other => other,
    }
}

/// The final line a person or a batch log reads.
fn summary(manifest: &manifests::Manifest) {
    println!(
        "{}: {} rows, rejected {}, {} artifacts",
        manifest.stage,
        manifest.metric_u64("rows").unwrap_or(0),
        manifest
            .metrics
            .get("rejected")
            .map(|v| v.to_string())
            .unwrap_or_else(|| "{}".into()),
        manifest.artifacts.len()
    );
}

fn main() -> ExitCode {
    manifests::cli::run_main(|| run(Cli::parse()))
}
