//! `grad_clip = "global"`: every gradient scaled by one factor, `max_norm / (norm + 1e-6)` with
//! the norm over all gradients together (`torch.nn.utils.clip_grad_norm_`), and nothing when
//! the norm is within the bound; `per_tensor` leaves the gradients to the optimizer.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};
use nn::backend;
use nn::training::{GradClip, squared_gradient_norm};

#[derive(Module, Debug)]
struct TwoLayers {
    first: Linear,
    second: Linear,
}

/// Every gradient of `model` in `grads`, flattened, in parameter order.
fn gradient_values<M: Module>(model: &M, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Read<'a> {
        grads: &'a GradientsParams,
        values: Vec<Vec<f32>>,
    }
    impl ModuleVisitor for Read<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                self.values
                    .push(grad.into_data().try_to_vec::<f32>().unwrap());
            }
        }
    }
    let mut read = Read {
        grads,
        values: Vec::new(),
    };
    model.visit(&mut read);
    read.values
}

fn norm(values: &[Vec<f32>]) -> f64 {
    values
        .iter()
        .flatten()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn global_clipping_scales_every_gradient_by_one_factor() {
    let device = backend::training_device("cpu").unwrap();
    let model = TwoLayers {
        first: LinearConfig::new(6, 5).init(&device),
        second: LinearConfig::new(5, 3).init(&device),
    };
    let x = Tensor::<2>::random([4, 6], Distribution::Normal(0.0, 3.0), &device);
    let grads = || {
        let loss = model.second.forward(model.first.forward(x.clone()));
        GradientsParams::from_grads(loss.powi_scalar(2).sum().backward(), &model)
    };
    let before = gradient_values(&model, &grads());
    assert_eq!(before.len(), 4, "two weights and two biases");
    let total = norm(&before);
    assert!(total > 1.0, "{total}");

    let squares = squared_gradient_norm(&model, &grads()).unwrap();
    let squares = squares.into_scalar::<f32>() as f64;
    assert!(
        (squares.sqrt() - total).abs() <= 1e-5 * total,
        "{squares} against {total}"
    );

    // The smallest gradient's own norm: at most half the total, as there are four.
    let (smallest, index) = before
        .iter()
        .enumerate()
        .map(|(i, t)| (norm(std::slice::from_ref(t)), i))
        .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a });
    assert!(smallest < total / 2.0, "{smallest} {total}");

    // Above the bound: one factor for all, and the clipped norm is the bound. The bound lies
    // between the smallest gradient's norm and half the total, whatever the random weights.
    let max_norm = ((smallest + total / 2.0) / 2.0) as f32;
    let clipped = gradient_values(&model, &GradClip::Global.apply(max_norm, &model, grads()));
    let factor = max_norm as f64 / (total + 1e-6);
    for (tensor, (clipped, original)) in clipped.iter().zip(&before).enumerate() {
        for (c, o) in clipped.iter().zip(original) {
            let expected = *o as f64 * factor;
            assert!(
                (*c as f64 - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                "tensor {tensor}: {c} against {expected}"
            );
        }
    }
    let clipped_norm = norm(&clipped);
    assert!(
        (clipped_norm - max_norm as f64).abs() <= 1e-4 * max_norm as f64,
        "{clipped_norm} against {max_norm}"
    );
    // Not what clipping each tensor to the same bound does: a tensor whose own norm is within
    // the bound, which per-tensor clipping would leave alone, is scaled down too (by a factor
    // under one half, as the bound is under half the total).
    assert!(smallest < max_norm as f64, "{smallest} {max_norm}");
    let scaled = norm(std::slice::from_ref(&clipped[index]));
    assert!(scaled < 0.5 * smallest, "{scaled} against {smallest}");

    // Within the bound, and per tensor: untouched.
    for (clip, max_norm) in [
        (GradClip::Global, (total * 2.0) as f32),
        (GradClip::PerTensor, (total / 4.0) as f32),
    ] {
        let kept = gradient_values(&model, &clip.apply(max_norm, &model, grads()));
        assert_eq!(kept, before, "{clip:?} at {max_norm}");
    }
    assert_eq!(GradClip::PerTensor.per_tensor(4.0), Some(4.0));
    assert_eq!(GradClip::Global.per_tensor(4.0), None);
}
