//! Parti's super-resolution model: WDSR-A (Yu et al. 2018, "Wide Activation for Efficient and
//! Accurate Image Super-Resolution"). The body runs at the input's resolution: residual blocks
//! that widen to `channels * expansion` before the ReLU and narrow back after it, every
//! convolution weight-normalised; a pixel shuffle turns channels into the larger picture. WDSR
//! carries the picture past the body with a learned 5x5 convolution; here bicubic upsampling
//! does it and the body's last convolution starts near zero, so a fresh model is (almost) the
//! baseline it is measured against and training only adds the detail bicubic misses.
//!
//! Fully convolutional: the same weights upscale any input size, so training reads crops and
//! inference whole pictures.

use burn::module::{Module, Param};
use burn::nn::PixelShuffle;
use burn::nn::PixelShuffleConfig;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, interpolate};
use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::Error;

/// What the network is; the stage's config names a preset of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuperResConfig {
    /// Side of the pictures it is trained to enlarge (the tokenizer's output).
    pub input_size: usize,
    /// Output side = `input_size * scale`.
    pub scale: usize,
    pub channels: usize,
    pub blocks: usize,
    /// Channels inside a block, as a multiple of `channels` (WDSR's wide activation).
    pub expansion: usize,
}

impl SuperResConfig {
    /// 64 -> 256 on the shapes data, trained in minutes on 2 CPU cores.
    pub fn tiny() -> SuperResConfig {
        SuperResConfig {
            input_size: 64,
            scale: 4,
            channels: 32,
            blocks: 4,
            expansion: 4,
        }
    }

    /// Parti's 256 -> 512 model: 12 residual blocks of 128 channels (about 15M parameters).
    pub fn paper_512() -> SuperResConfig {
        SuperResConfig {
            input_size: 256,
            scale: 2,
            channels: 128,
            blocks: 12,
            expansion: 4,
        }
    }

    /// Parti's 256 -> 1024 model: the same 12 blocks of 128 channels with twice the wide
    /// activation (about 30M parameters).
    pub fn paper_1024() -> SuperResConfig {
        SuperResConfig {
            expansion: 8,
            scale: 4,
            ..SuperResConfig::paper_512()
        }
    }

    pub fn preset(name: &str) -> Result<SuperResConfig, Error> {
        match name {
            "tiny" => Ok(SuperResConfig::tiny()),
            "512" => Ok(SuperResConfig::paper_512()),
            "1024" => Ok(SuperResConfig::paper_1024()),
            other => Err(Error::Usage(format!(
                "unknown super-resolution model '{other}' (tiny, 512, 1024)"
            ))),
        }
    }

    pub fn output_size(&self) -> usize {
        self.input_size * self.scale
    }

    /// Parameters of the model this config describes, found without building it (saturating:
    /// a config from a file may name any sizes).
    pub fn parameter_count(&self) -> u64 {
        let conv = |inputs: usize, outputs: usize| {
            let (inputs, outputs) = (inputs as u64, outputs as u64);
            // Direction (outputs x inputs x 3 x 3), a scale and a bias per filter.
            outputs
                .saturating_mul(inputs)
                .saturating_mul(9)
                .saturating_add(outputs.saturating_mul(2))
        };
        let wide = self.channels.saturating_mul(self.expansion);
        let out = self.scale.saturating_mul(self.scale).saturating_mul(3);
        let block = conv(self.channels, wide).saturating_add(conv(wide, self.channels));
        conv(3, self.channels)
            .saturating_add(block.saturating_mul(self.blocks as u64))
            .saturating_add(conv(self.channels, out))
    }

    pub fn check(&self) -> Result<(), Error> {
        if self.input_size == 0 || self.scale < 2 || self.channels == 0 || self.expansion == 0 {
            return Err(Error::Usage(format!(
                "super-resolution model {self:?}: input_size, channels and expansion must be \
                 positive and scale at least 2"
            )));
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> SuperResolution {
        let out = 3 * self.scale * self.scale;
        let wide = self.channels * self.expansion;
        SuperResolution {
            head: WeightNormConv::new(3, self.channels, 3, device),
            blocks: (0..self.blocks)
                .map(|_| WideBlock {
                    widen: WeightNormConv::new(self.channels, wide, 3, device),
                    narrow: WeightNormConv::new(wide, self.channels, 3, device),
                })
                .collect(),
            tail: WeightNormConv::new(self.channels, out, 3, device).quiet(),
            scale: self.scale,
            shuffle: PixelShuffleConfig::new(self.scale).init(),
        }
    }
}

/// A convolution whose weight is `g * v / |v|` per output channel (Salimans & Kingma 2016): the
/// direction and the scale of each filter learn separately, which WDSR trains with instead of
/// batch normalisation.
#[derive(Module, Debug)]
pub struct WeightNormConv {
    direction: Param<Tensor<4>>,
    scale: Param<Tensor<1>>,
    bias: Param<Tensor<1>>,
    padding: usize,
}

impl WeightNormConv {
    /// Starts as Burn's default convolution: `scale` is the norm of the initial direction.
    fn new(inputs: usize, outputs: usize, kernel: usize, device: &Device) -> WeightNormConv {
        let conv = Conv2dConfig::new([inputs, outputs], [kernel, kernel]).init(device);
        let direction = conv.weight.val().detach();
        let scale = filter_norms(direction.clone()).detach();
        let bias = match conv.bias {
            Some(bias) => bias.val().detach(),
            None => Tensor::zeros([outputs], device),
        };
        WeightNormConv {
            direction: Param::from_tensor(direction),
            scale: Param::from_tensor(scale),
            bias: Param::from_tensor(bias),
            padding: kernel / 2,
        }
    }

    /// The same convolution with every filter's scale at `QUIET_START` of its start and no
    /// bias: a near-silent output. Not zero: at zero no gradient would reach the layers below
    /// it, and the scales alone would have to find their way out of the saddle.
    fn quiet(self) -> WeightNormConv {
        let scale = self.scale.val().mul_scalar(QUIET_START).detach();
        WeightNormConv {
            scale: Param::from_tensor(scale),
            bias: Param::from_tensor(self.bias.val().zeros_like().detach()),
            ..self
        }
    }

    fn weight(&self) -> Tensor<4> {
        let direction = self.direction.val();
        let [outputs, ..] = direction.dims();
        let per_filter =
            (self.scale.val() / filter_norms(direction.clone())).reshape([outputs, 1, 1, 1]);
        direction * per_filter
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let padding = [self.padding, self.padding];
        conv2d(
            x,
            self.weight(),
            Some(self.bias.val()),
            ConvOptions::new([1, 1], padding, [1, 1], 1),
        )
    }
}

/// L2 norm of each output filter of a `[outputs, inputs, k, k]` weight.
fn filter_norms(weight: Tensor<4>) -> Tensor<1> {
    let [outputs, ..] = weight.dims();
    weight
        .powi_scalar(2)
        .reshape([outputs as i32, -1])
        .sum_dim(1)
        .sqrt()
        .reshape([outputs])
}

#[derive(Module, Debug)]
pub struct WideBlock {
    widen: WeightNormConv,
    narrow: WeightNormConv,
}

impl WideBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        x.clone() + self.narrow.forward(relu(self.widen.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct SuperResolution {
    head: WeightNormConv,
    blocks: Vec<WideBlock>,
    tail: WeightNormConv,
    scale: usize,
    shuffle: PixelShuffle,
}

/// The body's last convolution starts at this share of a default convolution's filters.
const QUIET_START: f64 = 1e-2;

/// Pixels are centred on mid-gray inside the network.
const MID_GRAY: f64 = 0.5;

impl SuperResolution {
    /// `[batch, 3, h, w]` in [0, 1] -> `[batch, 3, h * scale, w * scale]` (not clamped).
    pub fn forward(&self, pictures: Tensor<4>) -> Tensor<4> {
        let mut features = self.head.forward(pictures.clone().sub_scalar(MID_GRAY));
        for block in &self.blocks {
            features = block.forward(features);
        }
        let detail = self.shuffle.forward(self.tail.forward(features));
        bicubic(pictures, self.scale) + detail
    }
}

/// The baseline a super-resolution model has to beat: bicubic interpolation (half-pixel
/// centres, as PyTorch's and Pillow's image resizing). Not clamped: it overshoots at edges.
pub fn bicubic(pictures: Tensor<4>, scale: usize) -> Tensor<4> {
    let [_, _, height, width] = pictures.dims();
    let options = InterpolateOptions::new(InterpolateMode::Bicubic)
        .with_align_corners(false)
        .with_output_size([height * scale, width * scale]);
    interpolate(pictures, options)
}

/// Each `factor x factor` square averaged into one pixel (what a camera's larger pixels would
/// have seen): the smaller picture a super-resolution model learns to undo.
pub fn downscale(pictures: Tensor<4>, factor: usize) -> Tensor<4> {
    let [batch, channels, height, width] = pictures.dims();
    let (small_height, small_width) = (height / factor, width / factor);
    pictures
        .reshape([batch, channels, small_height, factor, small_width, factor])
        .mean_dim(5)
        .mean_dim(3)
        .reshape([batch, channels, small_height, small_width])
}
