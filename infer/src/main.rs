//! `infer`: images from a trained parti model.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use infer::sample::{Generator, SamplingConfig};
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

#[derive(Args)]
struct GenerateArgs {
    /// A `train parti` manifest (tokenizer, VQGAN and reranker are found through its inputs).
    #[arg(long)]
    parti: String,
    /// Override the VQGAN (e.g. a fine-tuned decoder's manifest).
    #[arg(long)]
    vqgan: Option<String>,
    /// Override the `train text-encoder` manifest used for reranking.
    #[arg(long)]
    text_encoder: Option<String>,
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    #[arg(long)]
    out: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    parti: String,
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => {
            let config: SamplingConfig = layered(
                &SamplingConfig::default(),
                args.sampling.config.as_deref(),
                args.sampling.overrides(),
            )?;
            let generator = Generator::load(
                &args.parti,
                args.vqgan.as_deref(),
                args.text_encoder.as_deref(),
                &args.device,
            )
            .context("loading the models")?;
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
            let manifest = evaluate(&config, &args.parti, &args.out, &args.device, args.force)
                .context("infer eval")?;
            let metric = |name: &str| {
                manifest
                    .metrics
                    .get(name)
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::NAN)
            };
            println!(
                "infer.eval: colour {:.3}, shape {:.3}, position {:.3}, all {:.3}",
                metric("color_accuracy"),
                metric("shape_accuracy"),
                metric("position_accuracy"),
                metric("all_accuracy")
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    manifests::cli::run_main(|| run(Cli::parse()))
}
