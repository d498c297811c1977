//! Text-side training stages of the parti pipeline (the models they train live in `models`).
//!
//! - [`tokenizer`]: `train tokenizer`, a SentencePiece (Unigram) tokenizer trained on the
//!   `ingest text` corpus and the captions of pairs/token shards.
//! - [`text_encoder`]: `train text-encoder`, BERT MLM on the text corpus mixed with a
//!   contrastive image-text objective.
//! - [`parti`]: `train parti`, the encoder-decoder Transformer over image tokens.

pub mod bench;
pub mod parti;
pub mod text_encoder;
pub mod tokenizer;

use manifests::Tool;

pub use tokenizer::TokenizerConfig;

pub use nn::Error;

pub fn tool() -> Tool {
    Tool {
        name: "train".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}
