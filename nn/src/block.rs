//! The pre-norm Transformer block (ViT, BERT-style encoders, and the decoder with
//! cross-attention).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Initializer, LayerNorm, LayerNormConfig, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};

use crate::attention::{KvCache, MultiHeadAttention, MultiHeadAttentionConfig};
use crate::fused;
use crate::mlp::{Mlp, MlpConfig};

#[derive(Config, Debug)]
pub struct TransformerBlockConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub d_mlp: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Adds cross-attention to an encoder's output (the seq2seq decoder).
    #[config(default = false)]
    pub cross_attention: bool,
}

#[derive(Module, Debug)]
pub struct TransformerBlock {
    pub norm_attention: LayerNorm,
    pub attention: MultiHeadAttention,
    pub norm_cross: Option<LayerNorm>,
    pub cross: Option<MultiHeadAttention>,
    pub norm_mlp: LayerNorm,
    pub mlp: Mlp,
    pub dropout: Dropout,
}

impl TransformerBlockConfig {
    fn attention_config(&self) -> MultiHeadAttentionConfig {
        MultiHeadAttentionConfig::new(self.d_model, self.n_heads).with_dropout(self.dropout)
    }

    fn mlp_config(&self) -> MlpConfig {
        MlpConfig::new(self.d_model, self.d_mlp).with_dropout(self.dropout)
    }

    pub fn init(&self, device: &Device) -> TransformerBlock {
        let norm = || LayerNormConfig::new(self.d_model).init(device);
        TransformerBlock {
            norm_attention: norm(),
            attention: self.attention_config().init(device),
            norm_cross: self.cross_attention.then(norm),
            cross: self
                .cross_attention
                .then(|| self.attention_config().init(device)),
            norm_mlp: norm(),
            mlp: self.mlp_config().init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }

    /// A block whose residual branches start at zero (the attention's and the MLP's output
    /// projections), so appended to a trained stack it leaves the stack's function exactly as
    /// it was until training moves it: how a deeper stack starts from a shallower trained one.
    pub fn init_identity(&self, device: &Device) -> TransformerBlock {
        let zeros = |d_input, d_output| {
            LinearConfig::new(d_input, d_output)
                .with_initializer(Initializer::Zeros)
                .init(device)
        };
        let mut block = self.init(device);
        block.attention.output = zeros(self.d_model, self.d_model);
        if let Some(cross) = block.cross.as_mut() {
            cross.output = zeros(self.d_model, self.d_model);
        }
        block.mlp.fc2 = zeros(self.d_mlp, self.d_model);
        block
    }

    /// Parameters, from the shape alone.
    pub fn num_params(&self) -> usize {
        let norm = 2 * self.d_model;
        let attention = self.attention_config().num_params();
        let cross = if self.cross_attention {
            norm + attention
        } else {
            0
        };
        2 * norm + attention + cross + self.mlp_config().num_params()
    }
}

/// Cross-attention input: the encoder's keys/values, projected once, and its padding mask.
#[derive(Debug, Clone)]
pub struct CrossContext {
    pub keys: Tensor<4>,
    pub values: Tensor<4>,
    pub mask: Option<Tensor<4, Bool>>,
}

impl TransformerBlock {
    /// Full-sequence forward. `context` is required when the block has cross-attention.
    pub fn forward(
        &self,
        x: Tensor<3>,
        mask: Option<Tensor<4, Bool>>,
        context: Option<&CrossContext>,
    ) -> Tensor<3> {
        let h = fused::layer_norm(&self.norm_attention, x.clone());
        let x = fused::add(
            x,
            self.dropout
                .forward(self.attention.forward(h.clone(), h, mask)),
        );
        self.cross_and_mlp(x, context)
    }

    /// Incremental forward over new positions, extending this layer's self-attention cache.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
        mask: Option<Tensor<4, Bool>>,
        context: Option<&CrossContext>,
    ) -> Tensor<3> {
        let h = fused::layer_norm(&self.norm_attention, x.clone());
        let x = fused::add(
            x,
            self.dropout
                .forward(self.attention.forward_cached(h, cache, mask)),
        );
        self.cross_and_mlp(x, context)
    }

    /// Projects an encoder output for this block's cross-attention (once per prompt).
    pub fn cross_context(
        &self,
        encoded: Tensor<3>,
        mask: Option<Tensor<4, Bool>>,
    ) -> Option<CrossContext> {
        let cross = self.cross.as_ref()?;
        let (keys, values) = cross.project_key_value(encoded);
        Some(CrossContext { keys, values, mask })
    }

    fn cross_and_mlp(&self, x: Tensor<3>, context: Option<&CrossContext>) -> Tensor<3> {
        let x = match (&self.cross, &self.norm_cross, context) {
            (Some(cross), Some(norm), Some(context)) => {
                let h = fused::layer_norm(norm, x.clone());
                let attended = cross.attend(
                    h,
                    context.keys.clone(),
                    context.values.clone(),
                    context.mask.clone(),
                );
                fused::add(x, self.dropout.forward(attended))
            }
            _ => x,
        };
        let h = fused::layer_norm(&self.norm_mlp, x.clone());
        fused::add(x, self.dropout.forward(self.mlp.forward(h)))
    }
}
