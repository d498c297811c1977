//! What parti's models and training stages share, below the `models` crate: the layers
//! (attention, MLP, Transformer blocks, position embeddings, patches) so they exist once, the
//! training machinery ([`training`]: schedules, checkpoints, micro-batch workers, publication;
//! [`cli`]: the shared training flags), data streams and image batches from pairs shards
//! ([`data`], [`images`]), progress bars and training charts ([`progress`], [`plot`]), training as a job of several processes on c10d ([`distributed`]),
//! the one [`Error`] of model and training code, and the one place where the Burn backend is
//! chosen ([`backend`]).
//!
//! Burn 0.22 tensors are backend-erased (`Tensor<D>`); a [`Device`](burn::tensor::Device) decides
//! where they run. Model code therefore never names a backend: [`backend::device`] turns a
//! `--device` flag into a device of the backend the cargo features selected.

pub mod attention;
pub mod backend;
pub mod bench;
pub mod block;
pub mod cli;
#[cfg(feature = "tch")]
mod csrc;
pub mod data;
pub mod distributed;
pub mod fused;
pub mod images;
pub mod mlp;
pub mod plot;
pub mod position;
pub mod progress;
pub mod training;
pub mod vision;

/// The error of parti's model and training code, shared by `models` and the stage crates that
/// train and use them; each message names the file, row or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] manifests::Error),
    /// Input data or weights that cannot be used (names the file or field).
    #[error("{0}")]
    Data(String),
    /// A command-line or config mistake.
    #[error("{0}")]
    Usage(String),
    /// The tokenizers library failed (training, loading, encoding or decoding).
    #[error("{0}")]
    Tokenizer(String),
    /// `--stop-after` was reached: the run saved a checkpoint and stopped.
    #[error(transparent)]
    Paused(#[from] training::Paused),
    #[error(transparent)]
    Checkpoint(#[from] training::CheckpointError),
    /// A collective failed, a peer was lost, or the launch variables are wrong.
    #[error(transparent)]
    Distributed(#[from] distributed::DistributedError),
}

pub use attention::{KvCache, MultiHeadAttention, MultiHeadAttentionConfig};
pub use block::{CrossContext, TransformerBlock, TransformerBlockConfig};
pub use mlp::{Mlp, MlpConfig};
pub use position::{LearnedPositions, LearnedPositionsConfig};
