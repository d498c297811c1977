//! `train`: the text-side training stages of the parti pipeline.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use manifests::cli::StageArgs;
use manifests::config::layered;
use nn::cli::TrainingArgs;
use serde_json::json;
use train::parti::{PartiInputs, PartiTrainConfig, train_parti};
use train::text_encoder::{TextEncoderInputs, TextEncoderTrainConfig, train_text_encoder};
use train::tokenizer::{self, Sources, TokenizerConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Text-side training: the SentencePiece tokenizer, text-encoder pretraining, the parti transformer."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a SentencePiece (Unigram) tokenizer on text and captions, or adopt a tokenizer.json.
    Tokenizer(TokenizerArgs),
    /// Pretrain the text encoder: BERT MLM on text shards + contrastive on pairs shards.
    TextEncoder(TextEncoderArgs),
    /// Train the encoder-decoder transformer from captions to image tokens.
    Parti(PartiArgs),
    /// Benchmark (not a test): ms per Parti train step, ours against PyTorch in the same run.
    /// Presets: tiny (the pipeline's model, batch 32), 350m-slice (the 350M model's width,
    /// two layers a side, 1024 image tokens) or 350m-ops (the 350M slice's ops on tensors too
    /// small to compute: what issuing them costs the host).
    Bench(nn::bench::TrainStepArgs),
    /// Benchmark (not a test): `train parti` tokens/s as a job of 1, 2, ... processes on this
    /// machine (c10d + Gloo on loopback; needs the tch backend), and the scaling efficiency.
    BenchDistributed(train::bench::ScalingArgs),
}

#[derive(Args)]
struct TextEncoderArgs {
    #[command(flatten)]
    training: TrainingArgs,
    /// The `train tokenizer` manifest.
    #[arg(long)]
    tokenizer: String,
    /// The `ingest text` manifest (MLM).
    #[arg(long)]
    text: String,
    /// The `ingest pairs` manifest (contrastive, and captions for MLM).
    #[arg(long)]
    pairs: String,
}

#[derive(Args)]
struct PartiArgs {
    #[command(flatten)]
    training: TrainingArgs,
    /// The `vqgan encode` manifest (token shards with captions).
    #[arg(long)]
    tokens: String,
    /// The `train tokenizer` manifest.
    #[arg(long)]
    tokenizer: String,
    /// A `train text-encoder` manifest to initialise the encoder from (optional).
    #[arg(long)]
    text_encoder: Option<String>,
}

impl TextEncoderArgs {
    fn inputs(&self) -> TextEncoderInputs<'_> {
        TextEncoderInputs {
            tokenizer: &self.tokenizer,
            text: &self.text,
            pairs: &self.pairs,
        }
    }
}

impl PartiArgs {
    fn inputs(&self) -> PartiInputs<'_> {
        PartiInputs {
            tokens: &self.tokens,
            tokenizer: &self.tokenizer,
            text_encoder: self.text_encoder.as_deref(),
        }
    }
}

#[derive(Args)]
struct TokenizerArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// An `ingest text` manifest (or its folder); repeat for several.
    #[arg(long)]
    text: Vec<String>,
    /// An `ingest pairs` or `vqgan encode` manifest whose captions to train on; repeatable.
    #[arg(long)]
    captions: Vec<String>,
    /// Use this tokenizer.json (any location) instead of training one; --text/--captions, if
    /// given, are only measured.
    #[arg(long, value_name = "TOKENIZER.json")]
    from_file: Option<String>,
    /// Pieces in the vocabulary, special tokens included (tiny: 1000, other presets: 16000).
    #[arg(long)]
    vocab_size: Option<u32>,
    /// Tokens per text; longer texts are cut (default 128).
    #[arg(long)]
    max_length: Option<usize>,
    /// Wrap every encoded text in <s> ... </s>.
    #[arg(long)]
    add_bos_eos: bool,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(args) => {
            train::bench::parti_step(&args)
                .context("train bench")?
                .report();
        }
        Command::BenchDistributed(args) => {
            print!(
                "{}",
                train::bench::scaling(&args).context("train bench-distributed")?
            );
        }
        Command::TextEncoder(args) => {
            let training = &args.training;
            let config = training.config(&TextEncoderTrainConfig::preset(training.preset())?)?;
            let manifest = train_text_encoder(&config, &args.inputs(), &training.options())
                .context("train text-encoder")?;
            println!(
                "{}: held-out MLM accuracy {:.3}, text->image recall@1 {:.3} (chance {:.3}), recall@5 {:.3}",
                manifest.stage,
                manifest.metric_f64("mlm_accuracy"),
                manifest.metric_f64("recall_at_1"),
                manifest.metric_f64("recall_at_1_chance"),
                manifest.metric_f64("recall_at_5")
            );
        }
        Command::Parti(args) => {
            let training = &args.training;
            let config = training.config(&PartiTrainConfig::preset(training.preset())?)?;
            let manifest =
                train_parti(&config, &args.inputs(), &training.options()).context("train parti")?;
            println!(
                "{}: validation perplexity {:.2}, token accuracy {:.3}",
                manifest.stage,
                manifest.metric_f64("val_perplexity"),
                manifest.metric_f64("val_token_accuracy")
            );
        }
        Command::Tokenizer(args) => {
            args.stage.refuse_seed("train tokenizer")?;
            let preset = TokenizerConfig::preset(args.stage.preset.as_deref().unwrap_or("tiny"))?;
            let overrides = json!({
                "vocab_size": args.vocab_size,
                "max_length": args.max_length,
                "add_bos_eos": args.add_bos_eos.then_some(true),
            });
            let config: TokenizerConfig =
                layered(&preset, args.stage.config.as_deref(), overrides)?;
            let sources = Sources {
                text: args.text,
                captions: args.captions,
                from_file: args.from_file,
            };
            let manifest =
                tokenizer::train_tokenizer(&config, &sources, &args.stage.out, args.stage.force)
                    .context("train tokenizer")?;
            let metric = |name: &str| manifest.metric_f64(name);
            println!(
                "{}: {} pieces, {} texts, {:.1} tokens per text, unk rate {:.4}",
                manifest.stage,
                metric("vocab_size"),
                metric("documents"),
                metric("mean_tokens_per_text"),
                metric("unk_rate"),
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    manifests::cli::run_main(|| run(Cli::parse()))
}
