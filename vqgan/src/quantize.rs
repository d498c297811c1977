//! The factorised, l2-normalised codebook (ViT-VQGAN section 3.2).
//!
//! Encoder outputs are projected to a low-dimensional lookup space (32 by default) and both they
//! and the codes are l2-normalised, so the nearest code is the one with the highest cosine
//! similarity. The paper reports ~96% codebook usage this way versus 2-4% without: this is the
//! main defence against codebook collapse.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Bool, Device, Int, Tensor};

#[derive(Config, Debug)]
pub struct QuantizerConfig {
    /// Number of codes (8192 in the paper).
    pub codebook_size: usize,
    /// Dimension of the lookup space (32 in Parti).
    #[config(default = 32)]
    pub code_dim: usize,
    /// Commitment weight beta (0.25).
    #[config(default = 0.25)]
    pub beta: f64,
}

#[derive(Module, Debug)]
pub struct Quantizer {
    /// `[codebook_size, code_dim]`, stored unnormalised; normalised at lookup.
    pub codebook: Param<Tensor<2>>,
    pub beta: f64,
}

/// The result of a lookup.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Quantised vectors with the straight-through gradient: the forward value is the code,
    /// the gradient flows to the encoder output unchanged. `[batch, tokens, code_dim]`
    pub codes: Tensor<3>,
    /// `[batch, tokens]`
    pub indices: Tensor<2, Int>,
    /// `||sg[z] - e||^2 + beta ||z - sg[e]||^2`, averaged.
    pub loss: Tensor<1>,
}

impl QuantizerConfig {
    pub fn init(&self, device: &Device) -> Quantizer {
        // Codebook initialised normal, as the paper; normalisation makes the scale irrelevant.
        let init = Initializer::Normal {
            mean: 0.0,
            std: 1.0,
        };
        Quantizer {
            codebook: init.init([self.codebook_size, self.code_dim], device),
            beta: self.beta,
        }
    }

    pub fn num_params(&self) -> usize {
        self.codebook_size * self.code_dim
    }
}

/// Unit vectors along the last dimension.
pub fn l2_normalize<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let norm = x
        .clone()
        .powi_scalar(2)
        .sum_dim(D - 1)
        .sqrt()
        .clamp_min(1e-12);
    x / norm
}

impl Quantizer {
    pub fn codebook_size(&self) -> usize {
        self.codebook.dims()[0]
    }

    /// The normalised codebook.
    pub fn normalized_codebook(&self) -> Tensor<2> {
        l2_normalize(self.codebook.val())
    }

    /// Nearest code by cosine similarity for each vector of `z: [batch, tokens, code_dim]`.
    pub fn lookup(&self, z: Tensor<3>) -> Tensor<2, Int> {
        let [batch, tokens, dim] = z.dims();
        let z = l2_normalize(z).reshape([batch * tokens, dim]);
        let similarity = z.matmul(self.normalized_codebook().transpose());
        similarity.argmax(1).reshape([batch, tokens])
    }

    /// Code vectors (normalised) of `indices: [batch, tokens]`.
    pub fn embed(&self, indices: Tensor<2, Int>) -> Tensor<3> {
        let [batch, tokens] = indices.dims();
        let codebook = self.normalized_codebook();
        let dim = codebook.dims()[1];
        codebook
            .select(0, indices.reshape([batch * tokens]))
            .reshape([batch, tokens, dim])
    }

    pub fn forward(&self, z: Tensor<3>) -> Quantized {
        let z = l2_normalize(z);
        let indices = self.lookup(z.clone());
        let codes = self.embed(indices.clone());
        let codebook_loss = (z.clone().detach() - codes.clone()).powi_scalar(2).mean();
        let commitment_loss = (z.clone() - codes.clone().detach()).powi_scalar(2).mean();
        let loss = codebook_loss + commitment_loss.mul_scalar(self.beta);
        // Straight-through estimator: value of the codes, gradient of z.
        let codes = z.clone() + (codes - z).detach();
        Quantized {
            codes,
            indices,
            loss,
        }
    }

    /// Replaces every code that `used` marks unused with one of the (normalised) encoder outputs
    /// `z`, chosen deterministically from `offset`. Collapse onto a handful of codes is the
    /// commonest VQ failure; restarting dead codes where the encoder's outputs actually are
    /// brings them back into play. Returns how many codes were restarted.
    pub fn restart_dead_codes(&mut self, z: Tensor<3>, used: &[bool], offset: usize) -> usize {
        let size = self.codebook_size();
        let dead: Vec<bool> = (0..size)
            .map(|k| !used.get(k).copied().unwrap_or(false))
            .collect();
        let restarted = dead.iter().filter(|d| **d).count();
        if restarted == 0 {
            return 0;
        }
        let [batch, tokens, dim] = z.dims();
        let rows = batch * tokens;
        let device = z.device();
        // A stride co-prime with typical batch sizes spreads the picks over the batch.
        let picks: Vec<i64> = (0..size)
            .map(|k| ((k * 7919 + offset) % rows) as i64)
            .collect();
        let candidates = l2_normalize(z.detach().reshape([rows, dim]))
            .select(0, Tensor::<1, Int>::from_data(picks.as_slice(), &device));
        let mask = Tensor::<1, Bool>::from_data(dead.as_slice(), &device)
            .reshape([size, 1])
            .expand([size, dim]);
        let codebook = std::mem::replace(
            &mut self.codebook,
            Param::from_tensor(Tensor::zeros([1, dim], &device)),
        );
        // Rebuilt from data so the parameter is a fresh leaf of the autodiff graph.
        self.codebook = codebook.map(|old| {
            let data = old.detach().mask_where(mask, candidates).into_data();
            Tensor::from_data(data, &device).require_grad()
        });
        restarted
    }
}

/// Which codes appear in `indices`, and the share of the codebook that is.
pub fn usage(indices: &Tensor<2, Int>, codebook_size: usize) -> (Vec<bool>, f64) {
    let mut used = vec![false; codebook_size];
    if let Ok(values) = indices.clone().into_data_as::<i64>().try_to_vec::<i64>() {
        for value in values {
            if let Some(slot) = usize::try_from(value).ok().and_then(|v| used.get_mut(v)) {
                *slot = true;
            }
        }
    }
    let share = used.iter().filter(|u| **u).count() as f64 / codebook_size.max(1) as f64;
    (used, share)
}
