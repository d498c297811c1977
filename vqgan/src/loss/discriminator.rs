//! The adversarial critic: a StyleGAN2-style residual discriminator (Karras et al. 2020), as
//! ViT-VQGAN trains against. Residual blocks halve the resolution down to 4x4, a minibatch
//! standard-deviation channel lets it see a batch's lack of variety, and two dense layers give
//! one logit per image.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::leaky_relu;
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use burn::tensor::{Device, Tensor};

use nn::fused;

const SLOPE: f64 = 0.2;
/// StyleGAN's minibatch-std group: at most this many images share one statistic.
const STD_GROUP: usize = 4;

#[derive(Config, Debug, PartialEq)]
pub struct DiscriminatorConfig {
    pub image_size: usize,
    /// Channels at full resolution, doubled at every halving up to `max_channels`.
    pub channels: usize,
    pub max_channels: usize,
}

impl DiscriminatorConfig {
    /// Residual blocks: one per halving from the image size down to 4x4.
    pub fn blocks(&self) -> usize {
        (self.image_size / 4).max(1).ilog2() as usize
    }

    fn channels_at(&self, block: usize) -> usize {
        (self.channels << block).min(self.max_channels)
    }

    pub fn init(&self, device: &Device) -> Discriminator {
        assert!(
            self.image_size >= 4 && self.image_size.is_power_of_two(),
            "the discriminator needs a power-of-two image size of at least 4"
        );
        let conv = |from: usize, to: usize, kernel: usize, bias: bool| {
            Conv2dConfig::new([from, to], [kernel, kernel])
                .with_padding(PaddingConfig2d::Explicit(
                    kernel / 2,
                    kernel / 2,
                    kernel / 2,
                    kernel / 2,
                ))
                .with_bias(bias)
                .init(device)
        };
        let blocks = (0..self.blocks())
            .map(|b| {
                let (from, to) = (self.channels_at(b), self.channels_at(b + 1));
                ResidualBlock {
                    conv1: conv(from, from, 3, true),
                    conv2: conv(from, to, 3, true),
                    skip: conv(from, to, 1, false),
                }
            })
            .collect();
        let last = self.channels_at(self.blocks());
        Discriminator {
            from_rgb: conv(3, self.channels, 1, true),
            blocks,
            final_conv: conv(last + 1, last, 3, true),
            dense: LinearConfig::new(last * 16, last).init(device),
            logit: LinearConfig::new(last, 1).init(device),
        }
    }
}

#[derive(Module, Debug)]
pub struct ResidualBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    skip: Conv2d,
}

#[derive(Module, Debug)]
pub struct Discriminator {
    from_rgb: Conv2d,
    blocks: Vec<ResidualBlock>,
    final_conv: Conv2d,
    dense: Linear,
    logit: Linear,
}

fn halve(x: Tensor<4>) -> Tensor<4> {
    avg_pool2d(x, AvgPoolOptions::new([2, 2]))
}

impl ResidualBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = leaky_relu(self.conv1.forward(x.clone()), SLOPE);
        let h = halve(leaky_relu(self.conv2.forward(h), SLOPE));
        // Scaled so the sum keeps the variance of one branch.
        (h + self.skip.forward(halve(x))).mul_scalar(std::f64::consts::FRAC_1_SQRT_2)
    }
}

/// Appends the standard deviation of each feature across a group of images, averaged into one
/// channel: a generator that collapses to one output shows a low value here.
fn minibatch_std(x: Tensor<4>) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let group = (1..=STD_GROUP.min(n))
        .rev()
        .find(|g| n.is_multiple_of(*g))
        .unwrap_or(1);
    let std = x
        .clone()
        .reshape([group, n / group, c, h, w])
        .var_bias(0)
        .add_scalar(1e-8)
        .sqrt()
        .mean_dim(2)
        .mean_dim(3)
        .mean_dim(4)
        .expand([group, n / group, 1, h, w])
        .reshape([n, 1, h, w]);
    Tensor::cat(vec![x, std], 1)
}

impl Discriminator {
    /// Images `[batch, 3, size, size]` in [0, 1] -> one logit per image `[batch]` (high: real).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<1> {
        let mut x = leaky_relu(
            self.from_rgb
                .forward(images.mul_scalar(2.0).sub_scalar(1.0)),
            SLOPE,
        );
        for block in &self.blocks {
            x = block.forward(x);
        }
        let x = leaky_relu(self.final_conv.forward(minibatch_std(x)), SLOPE);
        let [n, c, h, w] = x.dims();
        let x = leaky_relu(fused::linear(&self.dense, x.reshape([n, c * h * w])), SLOPE);
        fused::linear(&self.logit, x).reshape([n])
    }
}
