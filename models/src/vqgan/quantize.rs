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

#[derive(Config, Debug, PartialEq)]
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
        // In f32 inside a bf16 step too: similarities near 1 sit closer together than bf16
        // resolves, and `vqgan encode` chooses in f32.
        let _f32 = nn::fused::Autocast::pause();
        let [batch, tokens, dim] = z.dims();
        let z = nn::fused::to_dtype(z, self.codebook.val().dtype());
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
        // In the codebook's dtype: under bf16 autocast the encoder's output is bf16, and the
        // choice of codes, the losses and the straight-through sum below are f32 work.
        let z = l2_normalize(nn::fused::to_dtype(z, self.codebook.val().dtype()));
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

    /// Replaces every code marked in `dead` with one of the encoder outputs `z` the current
    /// codebook fits worst (lowest cosine to its nearest code). Collapse onto a handful of codes
    /// is the commonest VQ failure; restarting dead codes where the encoder's outputs are poorly
    /// served brings them back into play, and gives rare content (a small object on a plain
    /// background) codes of its own. Returns how many codes were restarted.
    pub fn restart_dead_codes(&mut self, z: Tensor<3>, dead: &[bool]) -> usize {
        let size = self.codebook_size();
        let dead: Vec<bool> = (0..size)
            .map(|k| dead.get(k).copied().unwrap_or(false))
            .collect();
        let restarted = dead.iter().filter(|d| **d).count();
        if restarted == 0 {
            return 0;
        }
        let [batch, tokens, dim] = z.dims();
        let rows = batch * tokens;
        let device = z.device();
        let z = l2_normalize(z.detach().reshape([rows, dim]));
        let best_fit = z
            .clone()
            .matmul(self.normalized_codebook().detach().transpose())
            .max_dim(1)
            .reshape([rows]);
        let worst_first = best_fit
            .argsort(0)
            .into_data_as::<i64>()
            .try_to_vec::<i64>()
            .unwrap_or_default();
        if worst_first.is_empty() {
            return 0;
        }
        // The k-th dead code takes the k-th worst-fitted output (cycling when codes outnumber
        // outputs), so one restart covers as many distinct poorly-served outputs as it can.
        let mut picks = vec![0i64; size];
        let mut next = 0usize;
        for (slot, is_dead) in picks.iter_mut().zip(&dead) {
            if *is_dead {
                *slot = worst_first[next % worst_first.len()];
                next += 1;
            }
        }
        let candidates = z.select(0, Tensor::<1, Int>::from_data(picks.as_slice(), &device));
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

/// Codebook health over a sliding window of steps: the step each code was last chosen, and
/// counts for perplexity. A code is dead when no batch of the window chose it, which is far
/// less jumpy than judging from a single batch (rare codes would be wiped every few steps).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CodeUsage {
    /// Step at which each code was last chosen (`None`: never).
    pub last_used: Vec<Option<usize>>,
    /// Step at which each code was last restarted: a restarted code gets a full window to be
    /// chosen before it can be restarted again, without counting as used.
    pub last_restarted: Vec<Option<usize>>,
    /// Choices per code since the last [`CodeUsage::take_counts`].
    pub counts: Vec<u64>,
}

impl CodeUsage {
    pub fn new(codebook_size: usize) -> CodeUsage {
        CodeUsage {
            last_used: vec![None; codebook_size],
            last_restarted: vec![None; codebook_size],
            counts: vec![0; codebook_size],
        }
    }

    pub fn record(&mut self, indices: &Tensor<2, Int>, step: usize) {
        for index in indices_of(indices) {
            if let Some(slot) = self.last_used.get_mut(index) {
                *slot = Some(step);
                self.counts[index] += 1;
            }
        }
    }

    fn within(last: Option<usize>, step: usize, window: usize) -> bool {
        last.is_some_and(|s| step.saturating_sub(s) < window)
    }

    /// Codes neither chosen nor restarted in the `window` steps up to `step`.
    pub fn dead(&self, step: usize, window: usize) -> Vec<bool> {
        self.last_used
            .iter()
            .zip(&self.last_restarted)
            .map(|(&used, &restarted)| {
                !Self::within(used, step, window) && !Self::within(restarted, step, window)
            })
            .collect()
    }

    /// Share of the codebook chosen in the `window` steps up to `step`.
    pub fn share(&self, step: usize, window: usize) -> f64 {
        let used = self
            .last_used
            .iter()
            .filter(|&&last| Self::within(last, step, window))
            .count();
        used as f64 / self.last_used.len().max(1) as f64
    }

    pub fn mark_restarted(&mut self, restarted: &[bool], step: usize) {
        for (last, &revived) in self.last_restarted.iter_mut().zip(restarted) {
            if revived {
                *last = Some(step);
            }
        }
    }

    /// Perplexity of the code distribution counted since the last call (codebook size when
    /// uniform, 1 when collapsed onto one code), and resets the counts.
    pub fn take_counts(&mut self) -> f64 {
        let perplexity = perplexity(&self.counts);
        self.counts.iter_mut().for_each(|c| *c = 0);
        perplexity
    }
}

pub fn perplexity(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let entropy: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    entropy.exp()
}

fn indices_of(indices: &Tensor<2, Int>) -> Vec<usize> {
    indices
        .clone()
        .into_data_as::<i64>()
        .try_to_vec::<i64>()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| usize::try_from(v).ok())
        .collect()
}

/// Which codes appear in `indices`, and the share of the codebook that is.
pub fn usage(indices: &Tensor<2, Int>, codebook_size: usize) -> (Vec<bool>, f64) {
    let mut used = vec![false; codebook_size];
    for index in indices_of(indices) {
        if let Some(slot) = used.get_mut(index) {
            *slot = true;
        }
    }
    let share = used.iter().filter(|u| **u).count() as f64 / codebook_size.max(1) as f64;
    (used, share)
}
