//! Building blocks shared by parti's three models (ViT-VQGAN, text encoder, seq2seq), so
//! attention, MLP, Transformer blocks and position embeddings exist once, and the one place
//! where the Burn backend is chosen.
//!
//! Burn 0.22 tensors are backend-erased (`Tensor<D>`); a [`Device`](burn::tensor::Device) decides
//! where they run. Model code therefore never names a backend: [`backend::device`] turns a
//! `--device` flag into a device of the backend the cargo features selected.

pub mod attention;
pub mod backend;
pub mod bench;
pub mod block;
pub mod data;
pub mod mlp;
pub mod position;
pub mod training;
pub mod vision;

pub use attention::{KvCache, MultiHeadAttention, MultiHeadAttentionConfig};
pub use block::{CrossContext, TransformerBlock, TransformerBlockConfig};
pub use mlp::{Mlp, MlpConfig};
pub use position::{LearnedPositions, LearnedPositionsConfig};
