//! Parti's encoder-decoder Transformer: the text encoder reads the caption, a decoder of
//! pre-norm blocks (causal self-attention, cross-attention to the text) writes the image token
//! grid one token at a time, with a head over the codebook.
//!
//! Self-attention is conv-shaped and sparse in most layers (DALL-E appendix B.1): the query that
//! predicts grid cell (r, c) sees only earlier tokens inside the k x k window around (r, c);
//! every `full_attention_every`-th layer sees all earlier tokens. Masks are built once per
//! shape ([`LayerMasks`]) and sliced row by row when sampling with the KV cache.
//!
//! Classifier-free guidance: a learned null condition stands in for the caption, at training
//! time with probability `cfg_dropout` per sample, at sampling time for the unconditional stream.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Int, Tensor};
use nn::attention::{KvCache, padding_mask};
use nn::fused::{cross_entropy, layer_norm, linear};
use nn::{CrossContext, LearnedPositions, LearnedPositionsConfig, TransformerBlock};

use crate::Error;
use crate::text_encoder::{TextEncoder, TextEncoderConfig};

#[derive(Config, Debug, PartialEq)]
pub struct PartiConfig {
    pub encoder: TextEncoderConfig,
    /// Image tokens per side (32 for 256 px; 8 for the tiny tokenizer).
    pub grid: usize,
    pub codebook_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_mlp: usize,
    /// Side of the conv-shaped attention window (odd; 0: every layer sees all earlier tokens).
    #[config(default = 11)]
    pub conv_window: usize,
    /// Every this-many-th decoder layer attends to all earlier tokens (0: none do).
    #[config(default = 4)]
    pub full_attention_every: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// Parti Table 1 (decoder layers, d_model, MLP, heads) and the CI-sized `tiny`.
fn decoder_shape(preset: &str) -> Result<(usize, usize, usize, usize), Error> {
    match preset {
        "tiny" => Ok((3, 128, 512, 4)),
        "350M" => Ok((12, 1024, 4096, 16)),
        "750M" => Ok((36, 1024, 4096, 16)),
        "3B" => Ok((36, 2048, 8192, 32)),
        "20B" => Ok((64, 4096, 16384, 64)),
        other => Err(Error::Usage(format!(
            "unknown model preset '{other}' (tiny, 350M, 750M, 3B, 20B)"
        ))),
    }
}

impl PartiConfig {
    pub fn preset(
        name: &str,
        vocab_size: usize,
        max_text_length: usize,
        grid: usize,
        codebook_size: usize,
    ) -> Result<Self, Error> {
        let encoder = TextEncoderConfig::preset(name, vocab_size, max_text_length)?;
        let (layers, d_model, mlp, heads) = decoder_shape(name)?;
        let window = if name == "tiny" { 5 } else { 11 };
        Ok(
            Self::new(encoder, grid, codebook_size, d_model, layers, heads, mlp)
                .with_conv_window(window),
        )
    }

    pub fn tokens(&self) -> usize {
        self.grid * self.grid
    }

    fn block(&self) -> nn::TransformerBlockConfig {
        nn::TransformerBlockConfig::new(self.d_model, self.n_heads, self.d_mlp)
            .with_dropout(self.dropout)
            .with_cross_attention(true)
    }

    /// Whether decoder layer `layer` uses the conv-shaped window.
    pub fn is_conv_layer(&self, layer: usize) -> bool {
        is_conv_layer(layer, self.conv_window, self.full_attention_every)
    }

    pub fn init(&self, device: &Device) -> Parti {
        let tokens = self.tokens();
        Parti {
            encoder: self.encoder.init(device),
            text_projection: LinearConfig::new(self.encoder.d_model, self.d_model).init(device),
            null_condition: Param::from_tensor(Tensor::zeros([1, 1, self.d_model], device)),
            // One extra id: the BOS token that starts every image.
            token_embedding: EmbeddingConfig::new(self.codebook_size + 1, self.d_model)
                .init(device),
            positions: LearnedPositionsConfig::new(tokens, self.d_model).init(device),
            blocks: (0..self.n_layers)
                .map(|_| self.block().init(device))
                .collect(),
            norm: LayerNormConfig::new(self.d_model).init(device),
            head: LinearConfig::new(self.d_model, self.codebook_size).init(device),
            grid: self.grid,
            conv_window: self.conv_window,
            full_attention_every: self.full_attention_every,
        }
    }

    /// Parameters of the Transformer layers (encoder and decoder blocks and their final norms),
    /// the figure Parti's Table 1 reports; embeddings and the output head are counted apart.
    pub fn transformer_params(&self) -> usize {
        self.encoder.n_layers * self.encoder.block().num_params()
            + 2 * self.encoder.d_model
            + self.n_layers * self.block().num_params()
            + 2 * self.d_model
    }

    /// Everything, computed from shapes alone (the 20B model needs no memory to be counted).
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        self.encoder.num_params()
            + (self.encoder.d_model * d + d)
            + d
            + (self.codebook_size + 1) * d
            + self.tokens() * d
            + self.n_layers * self.block().num_params()
            + 2 * d
            + (d * self.codebook_size + self.codebook_size)
    }
}

#[derive(Module, Debug)]
pub struct Parti {
    pub encoder: TextEncoder,
    /// Text features into the decoder's width.
    pub text_projection: Linear,
    /// Stands in for the caption (classifier-free guidance): `[1, 1, d_model]`.
    pub null_condition: Param<Tensor<3>>,
    pub token_embedding: Embedding,
    pub positions: LearnedPositions,
    pub blocks: Vec<TransformerBlock>,
    pub norm: LayerNorm,
    pub head: Linear,
    pub grid: usize,
    pub conv_window: usize,
    pub full_attention_every: usize,
}

/// The self-attention mask of each decoder layer for a full grid, `true` = blocked,
/// `[1, 1, tokens, tokens]`. Position 0 holds BOS, position i > 0 holds token i - 1, and
/// position i predicts token i.
#[derive(Debug, Clone)]
pub struct LayerMasks {
    pub causal: Tensor<4, Bool>,
    pub conv: Tensor<4, Bool>,
}

fn is_conv_layer(layer: usize, window: usize, full_every: usize) -> bool {
    window > 0 && !(full_every > 0 && layer % full_every == full_every - 1)
}

/// Whether the query at position `query` may see the key at position `key`.
pub fn conv_allowed(query: usize, key: usize, grid: usize, window: usize) -> bool {
    if key > query {
        return false;
    }
    if key == 0 || key == query {
        return true;
    }
    let half = (window / 2) as isize;
    let (qr, qc) = ((query / grid) as isize, (query % grid) as isize);
    let token = key - 1;
    let (kr, kc) = ((token / grid) as isize, (token % grid) as isize);
    (qr - kr).abs() <= half && (qc - kc).abs() <= half
}

impl LayerMasks {
    pub fn new(grid: usize, window: usize, device: &Device) -> LayerMasks {
        let n = grid * grid;
        let mut causal = vec![true; n * n];
        let mut conv = vec![true; n * n];
        for q in 0..n {
            for k in 0..=q {
                causal[q * n + k] = false;
                conv[q * n + k] = !conv_allowed(q, k, grid, window.max(1));
            }
        }
        let tensor = |values: Vec<bool>| {
            Tensor::<1, Bool>::from_data(values.as_slice(), device).reshape([1, 1, n, n])
        };
        LayerMasks {
            causal: tensor(causal),
            conv: tensor(conv),
        }
    }

    /// Rows `start..start + len` of the mask, over keys `0..start + len` (incremental decoding).
    pub fn rows(mask: &Tensor<4, Bool>, start: usize, len: usize) -> Tensor<4, Bool> {
        mask.clone()
            .slice([0..1, 0..1, start..start + len, 0..start + len])
    }
}

/// The text side once per prompt: encoder output in the decoder's width and its padding.
#[derive(Debug, Clone)]
pub struct Condition {
    pub encoded: Tensor<3>,
    pub padding: Tensor<2, Bool>,
}

/// Per-layer self-attention caches and cross-attention contexts for sampling.
#[derive(Debug, Clone)]
pub struct DecoderState {
    pub caches: Vec<KvCache>,
    pub contexts: Vec<CrossContext>,
    /// Positions already fed.
    pub position: usize,
}

impl Parti {
    pub fn tokens(&self) -> usize {
        self.grid * self.grid
    }

    pub fn bos_id(&self) -> usize {
        self.head.weight.dims()[1]
    }

    pub fn masks(&self, device: &Device) -> LayerMasks {
        LayerMasks::new(self.grid, self.conv_window, device)
    }

    fn layer_mask<'a>(&self, layer: usize, masks: &'a LayerMasks) -> &'a Tensor<4, Bool> {
        if is_conv_layer(layer, self.conv_window, self.full_attention_every) {
            &masks.conv
        } else {
            &masks.causal
        }
    }

    /// Encodes captions; rows where `drop` is true get the null condition instead.
    pub fn condition(
        &self,
        ids: Tensor<2, Int>,
        padding: Tensor<2, Bool>,
        drop: Option<Tensor<1, Bool>>,
    ) -> Condition {
        let encoded = linear(
            &self.text_projection,
            self.encoder.forward(ids, padding.clone()),
        );
        let Some(drop) = drop else {
            return Condition { encoded, padding };
        };
        let [batch, len, d] = encoded.dims();
        let device = encoded.device();
        let null = self.null_condition.val().expand([batch, len, d]);
        let drop_rows = drop.clone().reshape([batch, 1, 1]).expand([batch, len, d]);
        let encoded = encoded.mask_where(drop_rows, null);
        // A dropped row attends to its first position only (the null vector).
        let only_first = Tensor::<1, Bool>::from_data(
            (0..len).map(|i| i > 0).collect::<Vec<_>>().as_slice(),
            &device,
        )
        .reshape([1, len])
        .expand([batch, len]);
        let padding = padding.mask_where(drop.reshape([batch, 1]).expand([batch, len]), only_first);
        Condition { encoded, padding }
    }

    /// The unconditional stream for `batch` rows.
    pub fn null(&self, batch: usize, device: &Device) -> Condition {
        let d = self.null_condition.dims()[2];
        Condition {
            encoded: self.null_condition.val().expand([batch, 1, d]),
            padding: Tensor::<1, Bool>::from_data(vec![false; batch].as_slice(), device)
                .reshape([batch, 1]),
        }
    }

    /// Decoder inputs for teacher forcing: BOS then every token but the last.
    pub fn shift_right(&self, targets: Tensor<2, Int>) -> Tensor<2, Int> {
        let [batch, n] = targets.dims();
        let bos = Tensor::<2, Int>::full([batch, 1], self.bos_id() as i64, &targets.device());
        Tensor::cat(vec![bos, targets.slice([0..batch, 0..n - 1])], 1)
    }

    /// Embedded decoder inputs `[batch, len, d]` for input ids at positions `start..`.
    pub fn embed(&self, inputs: Tensor<2, Int>, start: usize) -> Tensor<3> {
        self.positions
            .forward(self.token_embedding.forward(inputs), start)
    }

    /// Logits `[batch, tokens, codebook]` for every position at once (training, scoring).
    pub fn forward(&self, targets: Tensor<2, Int>, condition: &Condition) -> Tensor<3> {
        let device = targets.device();
        let masks = self.masks(&device);
        self.forward_embedded(self.embed(self.shift_right(targets), 0), condition, &masks)
    }

    /// Like [`Parti::forward`] from embeddings (so tests can take gradients w.r.t. inputs).
    pub fn forward_embedded(
        &self,
        mut x: Tensor<3>,
        condition: &Condition,
        masks: &LayerMasks,
    ) -> Tensor<3> {
        let cross_mask = padding_mask(condition.padding.clone());
        for (layer, block) in self.blocks.iter().enumerate() {
            let context = block.cross_context(condition.encoded.clone(), Some(cross_mask.clone()));
            x = block.forward(
                x,
                Some(self.layer_mask(layer, masks).clone()),
                context.as_ref(),
            );
        }
        linear(&self.head, layer_norm(&self.norm, x))
    }

    /// Logits `[batch, codebook]` of the last of `inputs` (BOS + tokens so far) by a full
    /// recompute, without a cache: the reference the cached path is checked and timed against.
    pub fn last_logits_uncached(
        &self,
        inputs: Tensor<2, Int>,
        condition: &Condition,
        masks: &LayerMasks,
    ) -> Tensor<2> {
        let [batch, len] = inputs.dims();
        let prefix = LayerMasks {
            causal: LayerMasks::rows(&masks.causal, 0, len),
            conv: LayerMasks::rows(&masks.conv, 0, len),
        };
        let logits = self.forward_embedded(self.embed(inputs, 0), condition, &prefix);
        let vocab = self.bos_id();
        logits
            .slice([0..batch, len - 1..len, 0..vocab])
            .reshape([batch, vocab])
    }

    /// Starts incremental decoding: cross-attention keys/values are computed once here.
    pub fn start(&self, condition: &Condition) -> DecoderState {
        let cross_mask = padding_mask(condition.padding.clone());
        DecoderState {
            caches: (0..self.blocks.len())
                .map(|_| KvCache::with_capacity(self.tokens()))
                .collect(),
            contexts: self
                .blocks
                .iter()
                .filter_map(|b| {
                    b.cross_context(condition.encoded.clone(), Some(cross_mask.clone()))
                })
                .collect(),
            position: 0,
        }
    }

    /// Feeds the input at the next position (BOS first, then each sampled token) and returns
    /// the logits `[batch, codebook]` for the token at that position.
    pub fn step(
        &self,
        input: Tensor<2, Int>,
        state: &mut DecoderState,
        masks: &LayerMasks,
    ) -> Tensor<2> {
        let position = state.position;
        let mut x = self.embed(input, position);
        for (layer, block) in self.blocks.iter().enumerate() {
            let mask = LayerMasks::rows(self.layer_mask(layer, masks), position, 1);
            x = block.forward_cached(
                x,
                &mut state.caches[layer],
                Some(mask),
                state.contexts.get(layer),
            );
        }
        state.position += 1;
        let [batch, _, _] = x.dims();
        linear(&self.head, layer_norm(&self.norm, x)).reshape([batch, self.bos_id()])
    }
}

/// Teacher-forced cross-entropy, the mean over tokens.
pub fn token_loss(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    cross_entropy(logits, targets).mean()
}

/// The share of tokens whose most likely code is the target (a pass over every logit, so
/// training takes it only on the steps it logs).
pub fn token_accuracy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [batch, len, _] = logits.dims();
    logits
        .argmax(2)
        .reshape([batch, len])
        .equal(targets)
        .float()
        .mean()
}
