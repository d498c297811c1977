//! `infer`: images from a trained parti model.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use infer::sample::{Generator, SamplingConfig};
use infer::serve::{ServeConfig, router, shutdown_signal, spawn_worker};
use infer::{EvalConfig, evaluate, generate_to};
use manifests::config::layered;
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
    /// Sample images for prompts: PNGs, a grid per prompt and generations.json.
    Generate(GenerateArgs),
    /// Generate the shapes prompts and score colour, shape and position automatically.
    Eval(EvalArgs),
    /// HTTP server: POST /v1/generate, GET /healthz, and a page to try prompts at /.
    Serve(ServeArgs),
    /// Benchmark: sampling throughput with and without the KV cache (same decoder, same run).
    Bench(BenchArgs),
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
    #[arg(long)]
    guidance: Option<f64>,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
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
}

impl SamplingArgs {
    fn overrides(&self) -> serde_json::Value {
        json!({"guidance_scale": self.guidance, "temperature": self.temperature,
            "top_k": self.top_k, "top_p": self.top_p, "samples": self.samples,
            "keep": self.keep, "seed": self.seed,
            "use_cache": if self.no_cache { Some(false) } else { None }})
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
}

impl ModelArgs {
    fn load(&self) -> Result<Generator> {
        Generator::load(
            &self.parti,
            self.vqgan.as_deref(),
            self.text_encoder.as_deref(),
            &self.device,
        )
        .context("loading the models")
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    #[arg(long)]
    out: String,
    #[command(flatten)]
    sampling: SamplingArgs,
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
    #[arg(long)]
    prompts: Option<usize>,
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
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Most requests (with identical sampling settings) sampled together in one round.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most requests waiting for the sampler; more are answered with 503.
    #[arg(long, default_value_t = 32)]
    queue: usize,
    /// Seconds a request may wait and sample before it is answered with 504.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    #[arg(long, default_value_t = 500)]
    max_prompt_chars: usize,
    /// Milliseconds the sampler waits after a request for others to join its round.
    #[arg(long, default_value_t = 0)]
    batch_wait_ms: u64,
}

fn serve(args: ServeArgs) -> Result<()> {
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        anyhow::bail!("--timeout-s must be a positive number of seconds");
    }
    let config = ServeConfig {
        max_batch: args.max_batch,
        queue: args.queue,
        timeout: Duration::from_secs_f64(args.timeout_s),
        max_prompt_chars: args.max_prompt_chars,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
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
        infer::serve::serve(listener, router(worker.clone(), config), shutdown_signal())
            .await
            .context("serving")
    });
    worker.shutdown();
    served
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => {
            let config: SamplingConfig = layered(
                &SamplingConfig::default(),
                args.sampling.config.as_deref(),
                args.sampling.overrides(),
            )?;
            let generator = args.models.load()?;
            let prompts: Vec<&str> = args.prompts.iter().map(String::as_str).collect();
            let record =
                generate_to(&generator, &prompts, &config, &args.out).context("infer generate")?;
            println!(
                "{} prompts -> {} (see generations.json)",
                record["prompts"].as_array().map(Vec::len).unwrap_or(0),
                args.out
            );
        }
        Command::Eval(args) => {
            let defaults = EvalConfig::default();
            let overrides = json!({"prompts": args.prompts, "sampling": args.sampling.overrides()});
            let config: EvalConfig =
                layered(&defaults, args.sampling.config.as_deref(), overrides)?;
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
            println!(
                "infer.eval: colour {:.3}, shape {:.3}, position {:.3}, all {:.3}",
                metric("color_accuracy"),
                metric("shape_accuracy"),
                metric("position_accuracy"),
                metric("all_accuracy")
            );
        }
        Command::Serve(args) => serve(args)?,
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
