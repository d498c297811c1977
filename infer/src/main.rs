//! `infer`: images from a trained parti model.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use infer::sample::{Generator, SamplingSettings};
use infer::serve::{
    DEFAULT_MAX_BATCH, DEFAULT_MAX_CONNECTIONS, DEFAULT_QUEUE, ServeConfig, router,
    shutdown_signal, spawn_worker,
};
use infer::{
    EVAL_CAPTIONS, EVAL_PROMPTS, EvalConfig, PromptList, evaluate, generate_to, sampling_settings,
};
use manifests::cli::JobArgs;
use serde_json::json;

#[derive(Parser)]
#[command(
    version,
    about = "Generate images from captions with a trained parti model, and evaluate it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample images for prompts: PNGs, a grid per prompt and generations.json. A rerun into the
    /// same folder resumes; with --num-shards (or a scheduler's job variables) each job of a
    /// batch array samples its share of the list, and the one that finds every chunk done
    /// writes generations.json.
    Generate(GenerateArgs),
    /// Generate the shapes prompts and score colour, shape and position automatically.
    Eval(EvalArgs),
    /// HTTP server: POST /v1/generate, GET /healthz, GET /metrics (Prometheus), and a page to
    /// try prompts at /.
    Serve(ServeArgs),
    /// Benchmark: sampling throughput with and without the KV cache (same decoder, same run).
    Bench(BenchArgs),
    /// Load benchmark: concurrent single-sample requests against `serve` with cross-request
    /// batching and one request at a time (same model, same run).
    BenchServe(BenchServeArgs),
}

#[derive(Args)]
struct BenchServeArgs {
    /// A `train parti` manifest (e.g. runs/default/parti after `make pipeline`).
    #[arg(long)]
    parti: String,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct BenchArgs {
    /// Image tokens per side (32: Parti's 1024 tokens).
    #[arg(long, default_value_t = 32)]
    grid: usize,
    #[arg(long, default_value_t = 256)]
    d_model: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    peer: nn::bench::PeerArgs,
}

#[derive(Args)]
struct SamplingArgs {
    /// Classifier-free guidance scale (1: off; Parti used 1.2).
    #[arg(long, value_parser = manifests::cli::finite_f64)]
    guidance: Option<f64>,
    #[arg(long, value_parser = manifests::cli::finite_f64)]
    temperature: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, value_parser = manifests::cli::finite_f64)]
    top_p: Option<f64>,
    /// Samples per prompt; the reranker keeps the best `--keep`.
    #[arg(long)]
    samples: Option<usize>,
    #[arg(long)]
    keep: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Recompute every step instead of using the KV cache (slow; for comparison).
    #[arg(long)]
    no_cache: bool,
    /// TOML file with sampling settings, under the command-line values.
    #[arg(long)]
    config: Option<String>,
    /// Start from the settings this manifest records (an `infer eval` manifest: the settings
    /// it measured) instead of those the transformer's manifest recommends.
    #[arg(long)]
    sampling_from: Option<String>,
}

impl SamplingArgs {
    fn overrides(&self) -> serde_json::Value {
        json!({"guidance_scale": self.guidance, "temperature": self.temperature,
            "top_k": self.top_k, "top_p": self.top_p, "samples": self.samples,
            "keep": self.keep, "seed": self.seed,
            "use_cache": if self.no_cache { Some(false) } else { None }})
    }

    /// The settings to sample `parti` with, and where they came from.
    fn settings(&self, parti: &str) -> Result<SamplingSettings> {
        let settings = sampling_settings(
            parti,
            self.sampling_from.as_deref(),
            self.config.as_deref(),
            self.overrides(),
        )
        .context("sampling settings")?;
        eprintln!(
            "sampling with temperature {}, guidance {}, top-k {}, top-p {}, {} samples keeping {}, seed {}: {}",
            settings.settings.temperature,
            settings.settings.guidance_scale,
            settings.settings.top_k,
            settings.settings.top_p,
            settings.settings.samples,
            settings.settings.keep,
            settings.settings.seed,
            settings.source
        );
        Ok(settings)
    }
}

/// The models `generate` and `serve` sample with.
#[derive(Args)]
struct ModelArgs {
    /// A `train parti` manifest (tokenizer, VQGAN and reranker are found through its inputs).
    #[arg(long)]
    parti: String,
    /// Override the VQGAN (e.g. a fine-tuned decoder's manifest).
    #[arg(long)]
    vqgan: Option<String>,
    /// Override the `train text-encoder` manifest used for reranking.
    #[arg(long)]
    text_encoder: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Enlarge the kept pictures with this `vqgan superres` manifest's super-resolution model
    /// (e.g. runs/default/superres: 64 -> 256 px on the tiny preset).
    #[arg(long, value_name = "SUPERRES_MANIFEST")]
    upscale: Option<String>,
}

impl ModelArgs {
    fn load(&self) -> Result<Generator> {
        let generator = Generator::load(
            &self.parti,
            self.vqgan.as_deref(),
            self.text_encoder.as_deref(),
            &self.device,
        )
        .context("loading the models")?;
        match &self.upscale {
            Some(uri) => generator
                .with_upscaler(uri)
                .with_context(|| format!("--upscale {uri}")),
            None => Ok(generator),
        }
    }
}

/// Held-out captions `generate` draws when no prompt is given.
const DEFAULT_PROMPTS: usize = 4;

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// A caption to draw (repeat for several) [default: the first few held-out captions of the
    /// data the model was trained on]
    #[arg(long = "prompt", conflicts_with = "prompts_file")]
    prompts: Vec<String>,
    /// A list of prompts: `.tsv` or `.csv` with a header (PartiPrompts' TSV as it comes),
    /// `.jsonl`, or plain text with one prompt per line; a path or a bucket URI.
    #[arg(long, value_name = "FILE")]
    prompts_file: Option<String>,
    /// The column (or JSON key) holding the prompt [default: the first of prompt, caption and
    /// text, in any case].
    #[arg(long, requires = "prompts_file")]
    prompt_column: Option<String>,
    /// Pictures and `generations.json` go here; a rerun resumes what an earlier run into the
    /// same folder left undone.
    #[arg(long)]
    out: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Prompts sampled together: the unit a rerun resumes by and the jobs of a batch array
    /// share out (chunk `c` is job `c % jobs`'s). Each holds a KV cache per decoder row.
    #[arg(long, default_value_t = infer::generate::PROMPTS_PER_CHUNK,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    chunk_prompts: usize,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    parti: String,
    /// Decode with this VQGAN manifest (e.g. the fine-tuned decoder's, as Parti does) instead
    /// of the one the training tokens came from.
    #[arg(long)]
    vqgan: Option<String>,
    #[arg(long)]
    out: String,
    /// Shapes prompts (shapes data only; 0: none, no accuracy) [default: every colour x shape x
    /// position, 216]
    #[arg(long)]
    prompts: Option<usize>,
    /// Distinct held-out captions generated and scored against their real pictures (any data;
    /// needs the transformer's text encoder)
    #[arg(long, default_value_t = EVAL_CAPTIONS)]
    captions: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Default settings for requests that do not give them (the model's own unless changed).
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Most requests sampled together in one round, whatever their settings.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Most decoder rows in one round (a sample is one row, two with guidance); each holds its
    /// own KV cache [default: as many as keep a round's cache within 4 GiB, 32..=512]
    #[arg(long)]
    max_rows: Option<usize>,
    /// Most requests waiting for the sampler; more are answered with 503.
    #[arg(long, default_value_t = DEFAULT_QUEUE)]
    queue: usize,
    /// Seconds a request may wait and sample before it is answered with 504.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// Seconds a client may take to send a request's headers, and then its body.
    #[arg(long, default_value_t = 10.0)]
    read_timeout_s: f64,
    /// Connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    #[arg(long, default_value_t = 500)]
    max_prompt_chars: usize,
    /// Milliseconds without a new request the sampler waits for before it starts a round
    /// (clients that send together share one round instead of one waiting behind the other's).
    #[arg(long, default_value_t = 5)]
    batch_wait_ms: u64,
    /// The most milliseconds the sampler waits in all before a round, however often requests
    /// keep arriving.
    #[arg(long, default_value_t = 50)]
    batch_wait_limit_ms: u64,
}

fn serve(args: ServeArgs) -> Result<()> {
    let seconds = |value: f64, flag: &str| {
        Duration::try_from_secs_f64(value)
            .ok()
            .filter(|duration| !duration.is_zero())
            .with_context(|| format!("{flag} must be a positive number of seconds"))
    };
    let timeout = seconds(args.timeout_s, "--timeout-s")?;
    let read_timeout = seconds(args.read_timeout_s, "--read-timeout-s")?;
    anyhow::ensure!(
        args.max_connections > 0,
        "--max-connections must be at least 1"
    );
    let config = ServeConfig {
        max_batch: args.max_batch,
        max_rows: args.max_rows,
        queue: args.queue,
        timeout,
        read_timeout,
        max_connections: args.max_connections,
        max_prompt_chars: args.max_prompt_chars,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
        batch_wait_limit: Duration::from_millis(args.batch_wait_limit_ms),
        sampling: args.sampling.settings(&args.models.parti)?,
    };
    let generator = args.models.load()?;
    let worker = spawn_worker(generator, &config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .with_context(|| format!("binding {}", args.addr))?;
        println!(
            "infer serve: listening on http://{}",
            listener.local_addr()?
        );
        let limits = config.connection_limits();
        infer::serve::serve(
            listener,
            router(worker.clone(), config),
            shutdown_signal(),
            limits,
        )
        .await
        .context("serving")
    });
    worker.shutdown();
    served
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => {
            let sampling = args.sampling.settings(&args.models.parti)?;
            // The list is read before the models load, so a mistake in it shows at once.
            let given = match (&args.prompts_file, args.prompts.is_empty()) {
                (Some(file), _) => Some(
                    PromptList::read(file, args.prompt_column.as_deref())
                        .context("reading --prompts-file")?,
                ),
                (None, false) => Some(PromptList::from_texts(&args.prompts)),
                (None, true) => None,
            };
            let shard = args.job.shard()?;
            let generator = args.models.load()?;
            let list = match given {
                Some(list) => list,
                None => {
                    let held_out = infer::held_out_captions(
                        &args.models.parti,
                        generator.vqgan_config.image_size,
                        DEFAULT_PROMPTS,
                    )
                    .context("no --prompt given, and the held-out captions cannot be read")?;
                    eprintln!(
                        "no --prompt given: drawing {} held-out captions of the training data",
                        held_out.len()
                    );
                    PromptList::from_texts(&held_out)
                }
            };
            let done = generate_to(
                &generator,
                &list,
                &sampling,
                &args.out,
                shard,
                args.chunk_prompts,
            )
            .context("infer generate")?;
            let job = if shard.is_single() {
                String::new()
            } else {
                format!("job {} of {}: ", shard.index, shard.count)
            };
            println!(
                "{job}{} prompts in {} chunks; of this job's {} chunks, {} done before, {} sampled now",
                done.prompts,
                done.chunks,
                done.job_chunks,
                done.done_before,
                done.job_chunks - done.done_before
            );
            match done.index {
                Some(_) => println!(
                    "{} prompts -> {} (see generations.json)",
                    done.prompts, args.out
                ),
                None => println!(
                    "{} of {} chunks of the list done; the job that finds them all done writes {}/generations.json",
                    done.done_now, done.chunks, args.out
                ),
            }
        }
        Command::Eval(args) => {
            let config = EvalConfig {
                prompts: args.prompts.unwrap_or(EVAL_PROMPTS),
                captions: args.captions,
                sampling: args.sampling.settings(&args.parti)?.settings,
            };
            let manifest = evaluate(
                &config,
                &args.parti,
                args.vqgan.as_deref(),
                &args.out,
                &args.device,
                args.force,
            )
            .context("infer eval")?;
            let metric = |name: &str| manifest.metric_f64(name);
            if manifest.metrics.contains_key("all_accuracy") {
                println!(
                    "infer.eval: colour {:.3}, shape {:.3}, position {:.3}, all {:.3}",
                    metric("color_accuracy"),
                    metric("shape_accuracy"),
                    metric("position_accuracy"),
                    metric("all_accuracy")
                );
            }
            if let Some(captions) = manifest.metrics.get("captions") {
                let read =
                    |side: &str, name: &str| captions[side][name].as_f64().unwrap_or(f64::NAN);
                println!(
                    "infer.eval: {} held-out captions: similarity {:.3} (real pictures {:.3}), retrieval top-1 {:.3} (real {:.3}, chance {:.3})",
                    captions["captions"],
                    read("generated", "similarity"),
                    read("real", "similarity"),
                    read("generated", "retrieval_top1"),
                    read("real", "retrieval_top1"),
                    captions["chance_top1"].as_f64().unwrap_or(f64::NAN),
                );
            }
        }
        Command::Serve(args) => serve(args)?,
        Command::BenchServe(args) => {
            let report = infer::bench::serve_load(&args.parti, args.clients, &args.device)
                .context("infer bench-serve")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!(
                "{} single-sample requests at once on the {} model: {:.2} requests/s batched ({} rounds, p50 {:.2} s, p99 {:.2} s) vs {:.2} one at a time (p50 {:.2} s, p99 {:.2} s): {:.1}x",
                report.clients,
                report.model,
                report.batched.requests_per_second,
                report.batched.rounds,
                report.batched.latency_p50_seconds,
                report.batched.latency_p99_seconds,
                report.one_at_a_time.requests_per_second,
                report.one_at_a_time.latency_p50_seconds,
                report.one_at_a_time.latency_p99_seconds,
                report.speedup
            );
        }
        Command::Bench(args) => {
            let peer = args.peer.peer(&args.device);
            let report = infer::bench::kv_cache(
                args.grid,
                args.d_model,
                args.layers,
                args.batch,
                &args.device,
                peer.as_ref(),
            )
            .context("infer bench")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!(
                "KV cache: {:.1} tokens/s vs {:.1} without, {:.1}x faster at {} tokens",
                report.cached_tokens_per_second,
                report.uncached_tokens_per_second,
                report.speedup,
                report.tokens
            );
            if let (Some(torch), Some(ratio)) =
                (report.torch_tokens_per_second, report.torch_speedup)
            {
                println!(
                    "KV cache vs PyTorch (same decoder, its own KV cache): {:.1} tokens/s vs {:.1}, ours/PyTorch {:.2}x the throughput",
                    report.cached_tokens_per_second, torch, ratio
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    manifests::cli::run_main(|| run(Cli::parse()))
}
