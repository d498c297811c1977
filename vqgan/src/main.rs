//! `vqgan`: the ViT-VQGAN image tokenizer stage of the parti pipeline.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use manifests::cli::StageArgs;
use manifests::config::layered;
use serde_json::json;
use vqgan::train::{TrainConfig, TrainOptions, train};

#[derive(Parser)]
#[command(
    version,
    about = "ViT-VQGAN image tokenizer: train on an ingest pairs manifest."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stage 1: train encoder, codebook and decoder on the pairs shards of an ingest manifest.
    Train(TrainArgs),
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// The `ingest pairs` manifest (or its folder).
    #[arg(long)]
    pairs: String,
    /// cpu, cuda or cuda:N (CUDA needs the tch backend).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    learning_rate: Option<f64>,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => {
            let preset = TrainConfig::preset(args.stage.preset.as_deref().unwrap_or("tiny"))?;
            let overrides = json!({"steps": args.steps, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "seed": args.stage.seed});
            let config: TrainConfig = layered(&preset, args.stage.config.as_deref(), overrides)?;
            let options = TrainOptions {
                out: args.stage.out.clone(),
                device: args.device.clone(),
                force: args.stage.force,
            };
            let manifest = train(&config, &args.pairs, &options).context("vqgan train")?;
            println!(
                "{}: held-out PSNR {:.2} dB, codebook usage {:.3}",
                manifest.stage,
                manifest
                    .metrics
                    .get("psnr_db")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::NAN),
                manifest
                    .metrics
                    .get("codebook_usage")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    manifests::cli::run_main(|| run(Cli::parse()))
}
