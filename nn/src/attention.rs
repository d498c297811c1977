//! Multi-head attention with masks and an incremental key/value cache.
//!
//! Written out (rather than Burn's `MultiHeadAttention`) because the seq2seq decoder needs a real
//! KV cache for 1024-token sampling and conv-shaped masks that work step by step; the same layer
//! serves self-attention in the ViT-VQGAN and the text encoder.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};

use crate::fused;

#[derive(Config, Debug)]
pub struct MultiHeadAttentionConfig {
    pub d_model: usize,
    pub n_heads: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct MultiHeadAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
    pub dropout: Dropout,
    pub n_heads: usize,
}

impl MultiHeadAttentionConfig {
    pub fn init(&self, device: &Device) -> MultiHeadAttention {
        assert!(
            self.d_model.is_multiple_of(self.n_heads),
            "d_model {} is not a multiple of n_heads {}",
            self.d_model,
            self.n_heads
        );
        let linear = || LinearConfig::new(self.d_model, self.d_model).init(device);
        MultiHeadAttention {
            query: linear(),
            key: linear(),
            value: linear(),
            output: linear(),
            dropout: DropoutConfig::new(self.dropout).init(),
            n_heads: self.n_heads,
        }
    }

    pub fn num_params(&self) -> usize {
        4 * (self.d_model * self.d_model + self.d_model)
    }
}

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
///
/// Preallocated: each step writes its keys and values in place into `[batch, heads, capacity,
/// d_head]` buffers (the backend writes in place into storage nothing else holds) and attention
/// reads the first `len` positions as a view, so a 1024-token sample copies no cache. Without a
/// capacity (or past it) the buffers grow by doubling.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache that holds `capacity` positions before it needs to grow.
    pub fn with_capacity(capacity: usize) -> Self {
        KvCache {
            capacity,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `[batch, heads, new, d_head]` keys and values; returns views of all positions
    /// seen so far.
    pub fn append(&mut self, keys: Tensor<4>, values: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [batch, heads, new, d_head] = keys.dims();
        let end = self.len + new;
        let allocated = self.keys.as_ref().map_or(0, |k| k.dims()[2]);
        if self.keys.is_none() || end > allocated {
            let size = end.max(self.capacity).max(2 * allocated);
            let grow = |buffer: Option<Tensor<4>>| {
                let fresh = Tensor::zeros([batch, heads, size, d_head], &keys.device());
                match buffer {
                    Some(old) => {
                        fresh.slice_assign([0..batch, 0..heads, 0..allocated, 0..d_head], old)
                    }
                    None => fresh,
                }
            };
            self.keys = Some(grow(self.keys.take()));
            self.values = Some(grow(self.values.take()));
        }
        let region = [0..batch, 0..heads, self.len..end, 0..d_head];
        let write = |buffer: &mut Option<Tensor<4>>, new: Tensor<4>| {
            // Taken out, so the backend sees the buffer unshared and writes in place.
            let written = buffer.take().map(|b| b.slice_assign(region.clone(), new));
            *buffer = written;
        };
        write(&mut self.keys, keys);
        write(&mut self.values, values);
        self.len = end;
        let seen = |buffer: &Option<Tensor<4>>| {
            buffer
                .as_ref()
                .map(|b| b.clone().slice([0..batch, 0..heads, 0..end, 0..d_head]))
        };
        match (seen(&self.keys), seen(&self.values)) {
            (Some(keys), Some(values)) => (keys, values),
            // Unreachable: both buffers exist once `end > 0` (grown above).
            _ => unreachable!("the cache's buffers are allocated before the first write"),
        }
    }
}

impl MultiHeadAttention {
    /// `[batch, seq, d_model]` -> `[batch, heads, seq, d_head]`
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [batch, seq, d_model] = x.dims();
        x.reshape([batch, seq, self.n_heads, d_model / self.n_heads])
            .swap_dims(1, 2)
    }

    /// Keys and values of `context`, e.g. to compute cross-attention inputs once per prompt.
    pub fn project_key_value(&self, context: Tensor<3>) -> (Tensor<4>, Tensor<4>) {
        (
            self.split_heads(fused::linear(&self.key, context.clone())),
            self.split_heads(fused::linear(&self.value, context)),
        )
    }

    /// Attention of `queries: [batch, q, d]` over `context: [batch, k, d]`. `mask` is
    /// broadcastable to `[batch, heads, q, k]`; `true` blocks a query from a key.
    pub fn forward(
        &self,
        queries: Tensor<3>,
        context: Tensor<3>,
        mask: Option<Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let (keys, values) = self.project_key_value(context);
        self.attend(queries, keys, values, mask)
    }

    /// Self-attention for new positions `x: [batch, new, d]`, appending their keys and values to
    /// `cache`; `mask` is over `[.., new, seen + new]`.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
        mask: Option<Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let (keys, values) = self.project_key_value(x.clone());
        let (keys, values) = cache.append(keys, values);
        self.attend(x, keys, values, mask)
    }

    /// Attention over keys and values already projected (a cache or a cross-attention context).
    pub fn attend(
        &self,
        queries: Tensor<3>,
        keys: Tensor<4>,
        values: Tensor<4>,
        mask: Option<Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let [batch, q_len, d_model] = queries.dims();
        let queries = self.split_heads(fused::linear(&self.query, queries));
        let context = fused::attention(queries, keys, values, mask, &self.dropout)
            .swap_dims(1, 2)
            .reshape([batch, q_len, d_model]);
        fused::linear(&self.output, context)
    }
}

/// `true` above the diagonal: position t may not see t' > t. Shape `[1, 1, len, len]`.
pub fn causal_mask(len: usize, device: &Device) -> Tensor<4, Bool> {
    // Burn's `tril_mask` is `false` on and below the diagonal and `true` above it.
    Tensor::<2, Bool>::tril_mask([len, len], 0, device).unsqueeze::<4>()
}

/// Blocks padded keys: `padding: [batch, k]` (`true` = padding) -> `[batch, 1, 1, k]`.
pub fn padding_mask(padding: Tensor<2, Bool>) -> Tensor<4, Bool> {
    let [batch, len] = padding.dims();
    padding.reshape([batch, 1, 1, len])
}
