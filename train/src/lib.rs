//! Text-side training stages of the parti pipeline.
//!
//! - [`tokenizer`]: `train tokenizer`, a SentencePiece (Unigram) text tokenizer trained on the
//!   `ingest text` corpus and the captions of pairs/token shards, and [`TextTokenizer`], the
//!   loaded tokenizer the text encoder and the transformer use.
//! - [`text_encoder`] + [`pretrain`]: `train text-encoder`, BERT MLM on the text corpus mixed
//!   with a contrastive image-text objective.
//! - [`parti`] + [`seq2seq`]: `train parti`, the encoder-decoder Transformer over image tokens.

pub mod bench;
pub mod parti;
pub mod pretrain;
pub mod seq2seq;
pub mod text_encoder;
pub mod tokenizer;

use manifests::Tool;

pub use tokenizer::{TextTokenizer, TokenizerConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] manifests::Error),
    /// Input data that cannot be used (names the file or field).
    #[error("{0}")]
    Data(String),
    /// A command-line or config mistake.
    #[error("{0}")]
    Usage(String),
    /// The tokenizers library failed (training, loading, encoding or decoding).
    #[error("{0}")]
    Tokenizer(String),
    #[error(
        "stopped after step {step} as asked (--stop-after); the same command resumes from its checkpoint"
    )]
    Paused { step: usize },
}

pub fn tool() -> Tool {
    Tool {
        name: "train".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}
