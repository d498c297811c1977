//! `vqgan`: the ViT-VQGAN image tokenizer stages of the parti pipeline.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use manifests::cli::{JobArgs, StageArgs};
use manifests::config::layered;
use manifests::shards::tokens::{self, TokenRow};
use manifests::{Location, Manifest, Upstream};
use nn::cli::TrainingArgs;
use serde_json::json;
use vqgan::config::{FinetuneConfig, TrainConfig};
use vqgan::encode::{self, EncodeConfig, TokenizerRun};
use vqgan::superres::{SuperResStageConfig, train_superres};
use vqgan::train::{Inputs, finetune_decoder, train};

#[derive(Parser)]
#[command(
    version,
    about = "ViT-VQGAN image tokenizer: train, fine-tune a larger decoder, encode shards, decode tokens."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stage 1: train encoder, codebook and decoder on the pairs shards of an ingest manifest.
    Train(TrainArgs),
    /// Stage 2 (Parti): freeze the stage-1 encoder and codebook, train a larger decoder.
    FinetuneDecoder(FinetuneArgs),
    /// Pairs shards -> token shards (key, caption, tokens as list<uint16>).
    Encode(EncodeArgs),
    /// Held-out images through the tokenizer: PSNR/SSIM into a manifest, a side-by-side PNG.
    Reconstruct(ReconstructArgs),
    /// Tokens (a token shard, a `vqgan encode` manifest, or a list) -> PNG files.
    Decode(DecodeArgs),
    /// Parti's super-resolution model: trains on the pictures of a pairs stage at the larger
    /// size to enlarge the tokenizer's output (presets: tiny 64 -> 256, 512, 1024).
    Superres(SuperresArgs),
    /// Benchmark (not a test): ms per train step, ours against PyTorch in the same run.
    /// Presets: tiny (64 px, 64 tokens, batch 16) or small (256 px, 1024 tokens: the paper's
    /// ViT-VQGAN-Small).
    Bench(nn::bench::TrainStepArgs),
}

/// What both VQGAN training stages read.
#[derive(Args)]
struct ImageInputs {
    /// The `ingest pairs` manifest (or its folder).
    #[arg(long)]
    pairs: String,
    /// torchvision VGG-16 weights as safetensors (`features.N.weight/bias`, optionally LPIPS's
    /// `linK.model.1.weight`) for the perceptual loss; without it that term is off.
    #[arg(long, value_name = "FILE.safetensors")]
    vgg16: Option<String>,
}

impl ImageInputs {
    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            pairs: &self.pairs,
            vgg16: self.vgg16.as_deref(),
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    inputs: ImageInputs,
}

#[derive(Args)]
struct FinetuneArgs {
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    inputs: ImageInputs,
    /// The stage-1 `vqgan train` manifest.
    #[arg(long)]
    vqgan: String,
    /// Decoder preset: tiny-large, small, base, large.
    #[arg(long)]
    decoder: Option<String>,
}

/// A trained tokenizer and the pairs it reads.
#[derive(Args)]
struct TokenizerArgs {
    /// The `vqgan train` or `vqgan finetune-decoder` manifest.
    #[arg(long)]
    vqgan: String,
    /// The `ingest pairs` manifest (or its folder).
    #[arg(long)]
    pairs: String,
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl TokenizerArgs {
    fn run<'a>(&'a self, out: &'a str, force: bool) -> TokenizerRun<'a> {
        TokenizerRun {
            vqgan: &self.vqgan,
            pairs: &self.pairs,
            out,
            device: &self.device,
            force,
        }
    }
}

#[derive(Args)]
struct EncodeArgs {
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    tokenizer: TokenizerArgs,
    #[arg(long)]
    batch_size: Option<usize>,
    /// As a job of a batch array: encodes its slice of the pairs shards and writes
    /// `manifest.part-IIIII-of-NNNNN.json`; `manifests merge` joins the jobs' parts.
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Args)]
struct ReconstructArgs {
    #[arg(long)]
    out: String,
    #[command(flatten)]
    tokenizer: TokenizerArgs,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct SuperresArgs {
    #[command(flatten)]
    training: TrainingArgs,
    /// An `ingest pairs` manifest (or its folder) at the model's output size: the targets.
    #[arg(long)]
    pairs: String,
    /// The `vqgan train`/`finetune-decoder` manifest whose pictures the model learns to enlarge
    /// (the config's `input = "tokenizer"`).
    #[arg(long)]
    vqgan: Option<String>,
}

#[derive(Args)]
struct DecodeArgs {
    /// Folder (or bucket prefix) for the PNGs.
    #[arg(long)]
    out: String,
    #[arg(long)]
    vqgan: String,
    /// A token shard (.parquet) or a `vqgan encode` manifest.
    #[arg(long, conflicts_with = "list")]
    tokens: Option<String>,
    /// One token grid as comma-separated codes.
    #[arg(long)]
    list: Option<String>,
    /// Decode at most this many rows.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn summary(manifest: &Manifest) -> String {
    let metric = |name: &str| manifest.metric_f64(name);
    format!(
        "{}: held-out PSNR {:.2} dB, SSIM {:.3}, codebook usage {:.3}",
        manifest.stage,
        metric("psnr_db"),
        metric("ssim"),
        metric("codebook_usage")
    )
}

fn token_rows(args: &DecodeArgs) -> Result<Vec<TokenRow>> {
    if let Some(list) = &args.list {
        let tokens = list
            .split(',')
            .map(|t| t.trim().parse::<u16>())
            .collect::<Result<Vec<_>, _>>()
            .context("--list: expected comma-separated token numbers (0..65535)")?;
        return Ok(vec![TokenRow {
            key: "tokens".into(),
            caption: String::new(),
            tokens,
        }]);
    }
    let Some(source) = &args.tokens else {
        bail!("give --tokens (a token shard or encode manifest) or --list");
    };
    if source.ends_with(".parquet") {
        let bytes = Location::parse(source)?.get()?;
        return Ok(tokens::from_parquet(source, bytes)?);
    }
    let (stage, _) = Upstream::read(source)?;
    Ok(tokens::read_all(&stage)?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(TrainArgs { training, inputs }) => {
            let preset = TrainConfig::preset(training.preset())?;
            let config = training.config(&preset)?;
            let manifest =
                train(&config, &inputs.inputs(), &training.options()).context("vqgan train")?;
            println!("{}", summary(&manifest));
        }
        Command::FinetuneDecoder(args) => {
            let training = &args.training;
            let preset = FinetuneConfig::preset(training.preset())?;
            let overrides = json!({"decoder": args.decoder, "train": training.overrides()});
            let config: FinetuneConfig =
                layered(&preset, training.stage.config.as_deref(), overrides)?;
            let manifest = finetune_decoder(
                &config,
                &args.vqgan,
                &args.inputs.inputs(),
                &training.options(),
            )
            .context("vqgan finetune-decoder")?;
            println!("{}", summary(&manifest));
        }
        Command::Encode(args) => {
            args.stage.refuse_seed("vqgan encode")?;
            args.stage
                .refuse_preset("vqgan encode", "its one setting: --batch-size or --config")?;
            let overrides = json!({"batch_size": args.batch_size});
            let config: EncodeConfig = layered(
                &EncodeConfig::default(),
                args.stage.config.as_deref(),
                overrides,
            )?;
            let manifest = encode::encode(
                &config,
                &args.tokenizer.run(&args.stage.out, args.stage.force),
                args.job.shard()?,
            )
            .context("vqgan encode")?;
            println!(
                "{}: {} images -> {} token grids of {}x{}",
                manifest.stage,
                manifest.metric_u64("rows").unwrap_or(0),
                manifest.metric_u64("rows").unwrap_or(0),
                manifest.metric_u64("grid").unwrap_or(0),
                manifest.metric_u64("grid").unwrap_or(0),
            );
        }
        Command::Reconstruct(args) => {
            let manifest = encode::reconstruct(&args.tokenizer.run(&args.out, args.force))
                .context("vqgan reconstruct")?;
            println!("{}", summary(&manifest));
        }
        Command::Decode(args) => {
            let mut rows = token_rows(&args)?;
            if let Some(limit) = args.limit {
                rows.truncate(limit);
            }
            let written = encode::decode_to_pngs(&args.vqgan, &rows, &args.out, &args.device)
                .context("vqgan decode")?;
            println!("{} images written under {}", written.len(), args.out);
        }
        Command::Superres(args) => {
            let training = &args.training;
            let preset = SuperResStageConfig::preset(training.preset())?;
            let config = training.config(&preset)?;
            let manifest = train_superres(
                &config,
                &args.pairs,
                args.vqgan.as_deref(),
                &training.options(),
            )
            .context("vqgan superres")?;
            let metric = |name: &str| manifest.metric_f64(name);
            println!(
                "{}: held-out PSNR {:.2} dB (bicubic {:.2} dB, {:+.2} dB), SSIM {:.3} (bicubic {:.3})",
                manifest.stage,
                metric("psnr_db"),
                metric("bicubic_psnr_db"),
                metric("psnr_gain_db"),
                metric("ssim"),
                metric("bicubic_ssim")
            );
        }
        Command::Bench(args) => {
            vqgan::bench::train_step(&args)
                .context("vqgan bench")?
                .report();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    manifests::cli::run_main(|| run(Cli::parse()))
}
