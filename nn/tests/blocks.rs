//! The shared layers behave as the three models rely on: masks block information exactly, the
//! KV cache reproduces a full recompute, and parameter counts follow from the shapes.

use burn::module::Module;
use burn::tensor::{Bool, Device, Distribution, Tensor};
use nn::attention::{KvCache, causal_mask, padding_mask};
use nn::{TransformerBlockConfig, backend};

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[test]
fn kv_cache_reproduces_the_full_causal_forward_at_every_step() {
    let device = backend::device("cpu").unwrap();
    let block = TransformerBlockConfig::new(16, 4, 32).init(&device);
    let x = random([2, 7, 16], &device);
    let full = block.forward(x.clone(), Some(causal_mask(7, &device)), None);
    // Growing from nothing, growing past a small capacity, and preallocated for the whole run.
    for mut cache in [
        KvCache::default(),
        KvCache::with_capacity(3),
        KvCache::with_capacity(7),
    ] {
        for t in 0..7 {
            let step = block.forward_cached(
                x.clone().slice([0..2, t..t + 1, 0..16]),
                &mut cache,
                None,
                None,
            );
            let expected = full.clone().slice([0..2, t..t + 1, 0..16]);
            let diff = max_abs_diff(step, expected);
            assert!(diff < 1e-5, "step {t}: cached output differs by {diff}");
        }
        assert_eq!(cache.len(), 7);
    }
}

#[test]
fn causal_mask_lets_no_gradient_flow_from_later_positions() {
    let device = backend::training_device("cpu").unwrap();
    let block = TransformerBlockConfig::new(16, 4, 32).init(&device);
    let x = random([1, 6, 16], &device).require_grad();
    let out = block.forward(x.clone(), Some(causal_mask(6, &device)), None);
    let t = 2;
    let grads = out.slice([0..1, t..t + 1, 0..16]).sum().backward();
    let grad = x.grad(&grads).expect("input gradient");
    for position in 0..6 {
        let norm = grad
            .clone()
            .slice([0..1, position..position + 1, 0..16])
            .abs()
            .sum()
            .into_scalar::<f32>();
        if position > t {
            assert_eq!(norm, 0.0, "output {t} depends on later input {position}");
        } else {
            assert!(norm > 0.0, "output {t} should depend on input {position}");
        }
    }
}

#[test]
fn padded_keys_do_not_change_any_output() {
    let device = backend::device("cpu").unwrap();
    let block = TransformerBlockConfig::new(16, 4, 32).init(&device);
    let padding = Tensor::<2, Bool>::from_data([[false, false, false, true, true]], &device);
    let x = random([1, 5, 16], &device);
    let changed = Tensor::cat(
        vec![
            x.clone().slice([0..1, 0..3, 0..16]),
            random([1, 2, 16], &device),
        ],
        1,
    );
    let a = block
        .forward(x, Some(padding_mask(padding.clone())), None)
        .slice([0..1, 0..3, 0..16]);
    let b = block
        .forward(changed, Some(padding_mask(padding)), None)
        .slice([0..1, 0..3, 0..16]);
    assert_eq!(max_abs_diff(a, b), 0.0);
}

#[test]
fn parameter_counts_follow_from_the_shapes() {
    let device = backend::device("cpu").unwrap();
    for cross in [false, true] {
        let config = TransformerBlockConfig::new(24, 4, 40).with_cross_attention(cross);
        assert_eq!(
            config.init(&device).num_params(),
            config.num_params(),
            "cross={cross}"
        );
    }
}

#[test]
fn device_flags_are_checked() {
    assert!(backend::device("cpu").is_ok());
    assert!(
        backend::device("tpu")
            .unwrap_err()
            .to_string()
            .contains("tpu")
    );
    if backend::backend_name() == "flex" {
        assert!(
            backend::device("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("--features tch")
        );
    }
}
