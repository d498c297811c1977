//! Learned absolute position embeddings (ViT patches, text tokens, image-token grids).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

#[derive(Config, Debug)]
pub struct LearnedPositionsConfig {
    pub length: usize,
    pub d_model: usize,
}

#[derive(Module, Debug)]
pub struct LearnedPositions {
    /// `[length, d_model]`
    pub embedding: Param<Tensor<2>>,
}

impl LearnedPositionsConfig {
    pub fn init(&self, device: &Device) -> LearnedPositions {
        // Small normal init, as ViT and BERT: positions start as a gentle perturbation.
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        LearnedPositions {
            embedding: init.init([self.length, self.d_model], device),
        }
    }

    pub fn num_params(&self) -> usize {
        self.length * self.d_model
    }
}

impl LearnedPositions {
    /// Adds the embeddings of positions `offset..offset + seq` to `x: [batch, seq, d_model]`
    /// (in f32 when `x` came out of a bf16 product under autocast: [`crate::fused::add`]).
    pub fn forward(&self, x: Tensor<3>, offset: usize) -> Tensor<3> {
        let [_, seq, d_model] = x.dims();
        let positions = self
            .embedding
            .val()
            .slice([offset..offset + seq, 0..d_model])
            .unsqueeze::<3>();
        crate::fused::add(x, positions)
    }
}
