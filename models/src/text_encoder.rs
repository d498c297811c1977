//! The text encoder (Parti's seq2seq encoder) and what pretrains it: a BERT masked-language head
//! and a CLIP-style contrastive pair (an image tower and projections), plus the two objectives.
//!
//! All layers are `nn`'s: the encoder is embeddings + learned positions + pre-norm blocks + a
//! final layer norm (Parti's extra norm on the encoder output); the image tower is a small ViT
//! over patches, like the ViT-VQGAN encoder.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Int, Tensor};
use nn::attention::padding_mask;
use nn::fused::{cross_entropy, layer_norm, linear};
use nn::{LearnedPositions, LearnedPositionsConfig, TransformerBlock, TransformerBlockConfig};
use rand::Rng;

use crate::Error;

#[derive(Config, Debug, PartialEq)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    /// Longest text in tokens (128 in Parti).
    pub max_length: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_mlp: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// Parti's Table 1 shapes (encoder side) and a CI-sized `tiny`: (layers, d_model, mlp, heads).
pub fn encoder_shape(preset: &str) -> Result<(usize, usize, usize, usize), Error> {
    match preset {
        "tiny" => Ok((2, 128, 512, 4)),
        "350M" | "750M" => Ok((12, 1024, 4096, 16)),
        "3B" => Ok((12, 2048, 8192, 32)),
        "20B" => Ok((16, 4096, 16384, 64)),
        other => Err(Error::Usage(format!(
            "unknown model preset '{other}' (tiny, 350M, 750M, 3B, 20B)"
        ))),
    }
}

impl TextEncoderConfig {
    pub fn preset(name: &str, vocab_size: usize, max_length: usize) -> Result<Self, Error> {
        let (layers, d_model, mlp, heads) = encoder_shape(name)?;
        Ok(Self::new(
            vocab_size, max_length, d_model, layers, heads, mlp,
        ))
    }

    pub(crate) fn block(&self) -> TransformerBlockConfig {
        TransformerBlockConfig::new(self.d_model, self.n_heads, self.d_mlp)
            .with_dropout(self.dropout)
    }

    pub fn init(&self, device: &Device) -> TextEncoder {
        TextEncoder {
            embedding: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            positions: LearnedPositionsConfig::new(self.max_length, self.d_model).init(device),
            blocks: (0..self.n_layers)
                .map(|_| self.block().init(device))
                .collect(),
            norm: LayerNormConfig::new(self.d_model).init(device),
        }
    }

    /// Counted from shapes alone (no memory needed for the 20B encoder).
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        self.vocab_size * d
            + self.max_length * d
            + self.n_layers * self.block().num_params()
            + 2 * d
    }
}

#[derive(Module, Debug)]
pub struct TextEncoder {
    pub embedding: Embedding,
    pub positions: LearnedPositions,
    pub blocks: Vec<TransformerBlock>,
    pub norm: LayerNorm,
}

impl TextEncoder {
    /// `ids: [batch, len]`, `padding: [batch, len]` (true on padding) -> `[batch, len, d_model]`.
    /// Padded keys are masked out of every attention.
    pub fn forward(&self, ids: Tensor<2, Int>, padding: Tensor<2, Bool>) -> Tensor<3> {
        let mask = padding_mask(padding);
        let mut x = self.positions.forward(self.embedding.forward(ids), 0);
        for block in &self.blocks {
            x = block.forward(x, Some(mask.clone()), None);
        }
        layer_norm(&self.norm, x)
    }
}

/// Mean of `x: [batch, len, d]` over the real (non-padding) positions.
pub fn masked_mean(x: Tensor<3>, padding: Tensor<2, Bool>) -> Tensor<2> {
    let [batch, len, _] = x.dims();
    let real = padding.bool_not().float().reshape([batch, len, 1]);
    let count = real.clone().sum_dim(1).clamp_min(1.0);
    (x * real).sum_dim(1).div(count).squeeze_dim::<2>(1)
}

/// A small ViT over image patches for the contrastive objective.
#[derive(Config, Debug, PartialEq)]
pub struct ImageTowerConfig {
    pub image_size: usize,
    #[config(default = 8)]
    pub patch_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_mlp: usize,
}

#[derive(Module, Debug)]
pub struct ImageTower {
    pub patch_embedding: Linear,
    pub positions: LearnedPositions,
    pub blocks: Vec<TransformerBlock>,
    pub norm: LayerNorm,
    pub patch_size: usize,
}

impl ImageTowerConfig {
    /// Counted from shapes alone.
    pub fn num_params(&self) -> usize {
        let (d, grid) = (self.d_model, self.image_size / self.patch_size.max(1));
        let patch_values = 3 * self.patch_size.pow(2);
        let block = TransformerBlockConfig::new(d, self.n_heads, self.d_mlp);
        patch_values * d + d + grid * grid * d + self.n_layers * block.num_params() + 2 * d
    }

    pub fn init(&self, device: &Device) -> ImageTower {
        let grid = self.image_size / self.patch_size;
        ImageTower {
            patch_embedding: LinearConfig::new(3 * self.patch_size.pow(2), self.d_model)
                .init(device),
            positions: LearnedPositionsConfig::new(grid * grid, self.d_model).init(device),
            blocks: (0..self.n_layers)
                .map(|_| {
                    TransformerBlockConfig::new(self.d_model, self.n_heads, self.d_mlp).init(device)
                })
                .collect(),
            norm: LayerNormConfig::new(self.d_model).init(device),
            patch_size: self.patch_size,
        }
    }
}

impl ImageTower {
    /// Images `[batch, 3, size, size]` in [0, 1] -> pooled features `[batch, d_model]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let patches = nn::vision::patchify(images, self.patch_size)
            .mul_scalar(2.0)
            .sub_scalar(1.0);
        let mut x = self
            .positions
            .forward(linear(&self.patch_embedding, patches), 0);
        for block in &self.blocks {
            x = block.forward(x, None, None);
        }
        layer_norm(&self.norm, x).mean_dim(1).squeeze_dim::<2>(1)
    }
}

/// The contrastive pair: Parti discards it after pretraining; `infer` keeps it to rerank samples.
#[derive(Module, Debug)]
pub struct Contrastive {
    pub image_tower: ImageTower,
    pub text_projection: Linear,
    pub image_projection: Linear,
    /// log(1 / temperature), learned (CLIP initialises it at log(1 / 0.07)).
    pub logit_scale: Param<Tensor<1>>,
}

#[derive(Config, Debug, PartialEq)]
pub struct ContrastiveConfig {
    pub text_d_model: usize,
    pub image_tower: ImageTowerConfig,
    pub projection_dim: usize,
}

impl ContrastiveConfig {
    /// Counted from shapes alone: the image tower, both projections (no bias) and the learned
    /// temperature.
    pub fn num_params(&self) -> usize {
        self.image_tower.num_params()
            + (self.text_d_model + self.image_tower.d_model) * self.projection_dim
            + 1
    }

    pub fn init(&self, device: &Device) -> Contrastive {
        Contrastive {
            image_tower: self.image_tower.init(device),
            text_projection: LinearConfig::new(self.text_d_model, self.projection_dim)
                .with_bias(false)
                .init(device),
            image_projection: LinearConfig::new(self.image_tower.d_model, self.projection_dim)
                .with_bias(false)
                .init(device),
            logit_scale: Param::from_tensor(Tensor::from_floats([(1.0f32 / 0.07).ln()], device)),
        }
    }
}

fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

impl Contrastive {
    /// Unit-length text embeddings from an encoder output.
    pub fn embed_text(&self, encoded: Tensor<3>, padding: Tensor<2, Bool>) -> Tensor<2> {
        l2_normalize(linear(&self.text_projection, masked_mean(encoded, padding)))
    }

    pub fn embed_images(&self, images: Tensor<4>) -> Tensor<2> {
        l2_normalize(linear(
            &self.image_projection,
            self.image_tower.forward(images),
        ))
    }

    /// Symmetric InfoNCE over in-batch negatives: text i belongs to image i.
    pub fn loss(&self, text: Tensor<2>, images: Tensor<2>) -> Tensor<1> {
        let [batch, _] = text.dims();
        // Clamped as CLIP does (temperature >= 0.01), so the logits cannot blow up.
        let scale = self.logit_scale.val().clamp_max(100f32.ln()).exp();
        let logits = text.matmul(images.transpose()) * scale.unsqueeze::<2>();
        let diagonal = Tensor::<2>::eye(batch, &logits.device());
        let text_to_image = (log_softmax(logits.clone(), 1) * diagonal.clone()).sum();
        let image_to_text = (log_softmax(logits, 0) * diagonal).sum();
        (text_to_image + image_to_text).div_scalar(-2.0 * batch as f64)
    }
}

/// Everything pretraining optimises: the encoder, the MLM head and the contrastive pair.
#[derive(Module, Debug)]
pub struct Pretraining {
    pub encoder: TextEncoder,
    pub mlm_head: Linear,
    pub contrastive: Contrastive,
}

/// Masked-language loss over the positions with `weights` 1 (and accuracy there).
/// `logits: [batch, len, vocab]`, `targets: [batch, len]`, `weights: [batch, len]`.
pub fn mlm_loss(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    weights: Tensor<2>,
) -> (Tensor<1>, Tensor<1>) {
    let [batch, len, _] = logits.dims();
    let losses = cross_entropy(logits.clone(), targets.clone());
    let count = weights.clone().sum().clamp_min(1.0);
    let loss = (losses * weights.clone()).sum() / count.clone();
    let predicted = logits.argmax(2).reshape([batch, len]);
    let correct = predicted.equal(targets).float() * weights;
    (loss, correct.sum() / count)
}

/// Where `train tokenizer` puts its special tokens (pad, unk, bos, eos, mask: ids 0..=4); an
/// adopted tokenizer may have them elsewhere ([`SpecialIds`]).
pub const FIRST_ORDINARY_ID: u32 = 5;

/// A tokenizer's special tokens: MLM masking never selects them nor draws them as a
/// replacement, and puts `mask` where it masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: u32,
    pub unk: u32,
    pub bos: u32,
    pub eos: u32,
    pub mask: u32,
}

impl SpecialIds {
    /// A tokenizer `train tokenizer` trained: ids 0..=4 in this order.
    pub const TRAINED: SpecialIds = SpecialIds {
        pad: 0,
        unk: 1,
        bos: 2,
        eos: 3,
        mask: 4,
    };

    pub fn contains(&self, id: u32) -> bool {
        [self.pad, self.unk, self.bos, self.eos, self.mask].contains(&id)
    }
}

/// One sequence prepared for MLM: model input and, where a token was selected, its target.
#[derive(Debug, Clone, PartialEq)]
pub struct Masked {
    pub input: Vec<u32>,
    pub target: Vec<Option<u32>>,
}

/// BERT's masking: each ordinary token (not one of `special`) is selected with probability
/// `rate` (at least one per sequence); a selected token becomes the mask token 80% of the time,
/// a random ordinary token 10%, and stays itself 10%. The loss is taken on selected positions
/// only. Random tokens are drawn from ids `FIRST_ORDINARY_ID..vocab_size` that are not special.
pub fn mask_tokens(
    ids: &[u32],
    rate: f64,
    vocab_size: usize,
    special: SpecialIds,
    rng: &mut impl Rng,
) -> Masked {
    let ordinary: Vec<usize> = (0..ids.len())
        .filter(|&i| !special.contains(ids[i]))
        .collect();
    // Whether a random ordinary token can be drawn at all (a vocabulary of specials has none).
    let drawable = (FIRST_ORDINARY_ID..vocab_size as u32).any(|id| !special.contains(id));
    let mut selected: Vec<usize> = ordinary
        .iter()
        .copied()
        .filter(|_| rng.random_bool(rate.clamp(0.0, 1.0)))
        .collect();
    if selected.is_empty() && !ordinary.is_empty() {
        selected.push(ordinary[rng.random_range(0..ordinary.len())]);
    }
    let mut input = ids.to_vec();
    let mut target = vec![None; ids.len()];
    for i in selected {
        target[i] = Some(ids[i]);
        let roll: f64 = rng.random();
        if roll < 0.8 {
            input[i] = special.mask;
        } else if roll < 0.9 && drawable {
            // A trained tokenizer has no special id in the range, so this draws once, as
            // before specials could lie elsewhere.
            input[i] = loop {
                let id = rng.random_range(FIRST_ORDINARY_ID..vocab_size as u32);
                if !special.contains(id) {
                    break id;
                }
            };
        }
    }
    Masked { input, target }
}

/// What `train text-encoder` publishes as its config artifact, so `infer` and `train parti`
/// can rebuild the two models.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PretrainedConfigs {
    pub text_encoder: TextEncoderConfig,
    pub contrastive: ContrastiveConfig,
}

/// Pads token lists to the longest (at most `max_length`): ids `[batch, len]`, padding mask.
pub fn pad_batch(
    rows: &[&[u32]],
    pad_id: u32,
    max_length: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Bool>) {
    let len = rows
        .iter()
        .map(|r| r.len().min(max_length))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = vec![pad_id as i32; rows.len() * len];
    let mut padding = vec![true; rows.len() * len];
    for (row, tokens) in rows.iter().enumerate() {
        for (column, &id) in tokens.iter().take(len).enumerate() {
            ids[row * len + column] = id as i32;
            padding[row * len + column] = false;
        }
    }
    (
        Tensor::<1, Int>::from_data(ids.as_slice(), device).reshape([rows.len(), len]),
        Tensor::<1, Bool>::from_data(padding.as_slice(), device).reshape([rows.len(), len]),
    )
}
