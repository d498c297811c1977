//! The perceptual term: distances between VGG-16 features of the output and the target, the
//! LPIPS recipe (Zhang et al. 2018). The weights are the user's: a safetensors file with
//! torchvision's VGG-16 `features.N.weight/bias` tensors (any prefix), optionally with LPIPS's
//! learned channel weights (`linK.model.1.weight`); without those, channels weigh the same.

use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::Error;

/// VGG-16's convolutions: (torchvision `features` index, input channels, output channels).
/// A 2x2 max pool follows indices 2, 7, 14 and 21.
pub const VGG16_CONVS: [(usize, usize, usize); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];
/// LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3: after these convolutions.
const TAPS: [usize; 5] = [2, 7, 14, 21, 28];
/// ImageNet statistics the VGG weights were trained with.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

struct ConvLayer {
    index: usize,
    weight: Tensor<4>,
    bias: Tensor<1>,
}

/// Frozen VGG-16 features: constants, never trained, on the training device.
pub struct Vgg16Features {
    convs: Vec<ConvLayer>,
    /// LPIPS channel weights per tap, when the file has them.
    channel_weights: Option<Vec<Tensor<4>>>,
    mean: Tensor<4>,
    std: Tensor<4>,
}

fn floats(
    view: &safetensors::tensor::TensorView<'_>,
    file: &str,
    name: &str,
) -> Result<Vec<f32>, Error> {
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Data(format!(
                "{file}: {name}: dtype {other:?} (expected F32, F16 or BF16)"
            )));
        }
    };
    Ok(values)
}

impl Vgg16Features {
    /// Reads VGG-16 from safetensors `bytes`; `file` names it in errors, which also name the
    /// missing or misshapen tensor.
    pub fn from_safetensors(bytes: &[u8], file: &str, device: &Device) -> Result<Self, Error> {
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Data(format!("{file}: not a safetensors file: {e}")))?;
        let names = tensors.names();
        let find = |suffix: &str| -> Option<String> {
            names
                .iter()
                .find(|n| **n == suffix || n.ends_with(&format!(".{suffix}")))
                .map(|n| n.to_string())
        };
        let load = |suffix: &str, shape: &[usize]| -> Result<TensorData, Error> {
            let name = find(suffix).ok_or_else(|| {
                Error::Data(format!(
                    "{file}: no tensor '{suffix}' (is this torchvision's VGG-16?)"
                ))
            })?;
            let view = tensors
                .tensor(&name)
                .map_err(|e| Error::Data(format!("{file}: {name}: {e}")))?;
            if view.shape() != shape {
                return Err(Error::Data(format!(
                    "{file}: {name} has shape {:?}, VGG-16 needs {shape:?}",
                    view.shape()
                )));
            }
            Ok(TensorData::new(floats(&view, file, &name)?, shape.to_vec()))
        };
        let mut convs = Vec::with_capacity(VGG16_CONVS.len());
        for (index, from, to) in VGG16_CONVS {
            let weight = load(&format!("features.{index}.weight"), &[to, from, 3, 3])?;
            let bias = load(&format!("features.{index}.bias"), &[to])?;
            convs.push(ConvLayer {
                index,
                weight: Tensor::from_data(weight, device),
                bias: Tensor::from_data(bias, device),
            });
        }
        let tap_channels =
            TAPS.map(|tap| VGG16_CONVS.iter().find(|c| c.0 == tap).map_or(0, |c| c.2));
        let channel_weights = if find("lin0.model.1.weight").is_some() {
            let mut weights = Vec::with_capacity(TAPS.len());
            for (k, channels) in tap_channels.iter().enumerate() {
                let data = load(&format!("lin{k}.model.1.weight"), &[1, *channels, 1, 1])?;
                weights.push(Tensor::from_data(data, device));
            }
            Some(weights)
        } else {
            None
        };
        let column = |values: [f32; 3]| {
            Tensor::<1>::from_data(TensorData::new(values.to_vec(), [3]), device)
                .reshape([1, 3, 1, 1])
        };
        Ok(Vgg16Features {
            convs,
            channel_weights,
            mean: column(MEAN),
            std: column(STD),
        })
    }

    /// Whether the file carried LPIPS's learned channel weights.
    pub fn has_lpips_weights(&self) -> bool {
        self.channel_weights.is_some()
    }

    /// The five tapped feature maps of images in [0, 1].
    fn features(&self, images: Tensor<4>) -> Vec<Tensor<4>> {
        let mut x = (images - self.mean.clone()) / self.std.clone();
        let mut taps = Vec::with_capacity(TAPS.len());
        let same = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        for layer in &self.convs {
            x = relu(conv2d(
                x,
                layer.weight.clone(),
                Some(layer.bias.clone()),
                same.clone(),
            ));
            if TAPS.contains(&layer.index) {
                taps.push(x.clone());
                if layer.index != TAPS[TAPS.len() - 1] {
                    x = max_pool2d(x, MaxPoolOptions::new([2, 2]));
                }
            }
        }
        taps
    }

    /// Mean perceptual distance between two batches of images `[batch, 3, size, size]` in
    /// [0, 1] (size >= 16): per tap, channel-normalised features, squared difference weighted
    /// over channels, averaged over positions; summed over taps, averaged over the batch.
    pub fn distance(&self, a: Tensor<4>, b: Tensor<4>) -> Tensor<1> {
        // Each tap in the images' dtype: under bf16 autocast the convolutions return bf16, and
        // the normalisation and the weighted distance are f32 work, as PyTorch's would promote.
        let dtype = a.dtype();
        let unit = |f: Tensor<4>| {
            let f = nn::fused::to_dtype(f, dtype);
            let norm = f.clone().powi_scalar(2).sum_dim(1).sqrt().add_scalar(1e-10);
            f / norm
        };
        let mut total: Option<Tensor<1>> = None;
        for (k, (fa, fb)) in self
            .features(a)
            .into_iter()
            .zip(self.features(b))
            .enumerate()
        {
            let squared = (unit(fa) - unit(fb)).powi_scalar(2);
            let per_position = match &self.channel_weights {
                Some(weights) => (squared * weights[k].clone()).sum_dim(1),
                None => squared.mean_dim(1),
            };
            let term = per_position.mean();
            total = Some(match total {
                Some(t) => t + term,
                None => term,
            });
        }
        total.unwrap_or_else(|| Tensor::zeros([1], &self.mean.device()))
    }
}
