//! The Transformer feed-forward layer: Linear -> GELU -> Linear, with dropout.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use crate::fused;

#[derive(Config, Debug)]
pub struct MlpConfig {
    pub d_model: usize,
    pub d_hidden: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub dropout: Dropout,
}

impl MlpConfig {
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            fc1: LinearConfig::new(self.d_model, self.d_hidden).init(device),
            fc2: LinearConfig::new(self.d_hidden, self.d_model).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }

    /// Parameters, computed from the shape alone (no memory needed for paper-sized presets).
    pub fn num_params(&self) -> usize {
        2 * self.d_model * self.d_hidden + self.d_hidden + self.d_model
    }
}

impl Mlp {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let hidden = fused::gelu(fused::linear(&self.fc1, x));
        fused::linear(&self.fc2, self.dropout.forward(hidden))
    }
}
