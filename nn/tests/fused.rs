//! Each fused operation against its composition, forward and in every gradient, for every mask
//! kind the models use (none, causal, the conv-shaped window, key padding, cross-attention with
//! padding). On `tch` that holds libtorch's kernels (SDPA, layer norm, cross-entropy, through a
//! Burn custom autodiff operation) against Burn's composed ops; on `flex` there is no fused
//! kernel and both sides run the composition, so there the test checks only the plumbing.
//!
//! Tolerance: the fused kernels sum in another order (attention blockwise with a running
//! maximum, layer norm in one pass), so results agree to f32 rounding, not bit for bit:
//! max |a - b| <= 2e-5 * (1 + max |b|).
//!
//! They run on the CPU, or on the device `PARTI_TEST_DEVICE` names (`make test-gpu`: `cuda`,
//! where libtorch picks other kernels: flash, memory-efficient or cuDNN attention). The tests
//! that hold our kernels bit for bit against libtorch's own autograd stay on the CPU: some of
//! CUDA's backward kernels accumulate with atomics, so two runs need not agree in the last bit.

use burn::nn::{DropoutConfig, LayerNormConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Bool, Device, Distribution, Int, Tensor};
use nn::attention::{causal_mask, padding_mask};
use nn::{backend, fused};

/// The device these tests run on: `PARTI_TEST_DEVICE` (`cpu` unless set; `make test-gpu` sets
/// `cuda`), except where a test holds kernels bit for bit against libtorch's CPU results.
fn test_device() -> String {
    std::env::var("PARTI_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[track_caller]
fn assert_close<const D: usize>(what: &str, ours: Tensor<D>, reference: Tensor<D>) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shapes");
    let scale = reference.clone().abs().max().into_scalar::<f32>();
    let difference = (ours - reference).abs().max().into_scalar::<f32>();
    assert!(
        difference <= 2e-5 * (1.0 + scale),
        "{what}: differs by {difference} (values up to {scale})"
    );
}

#[track_caller]
fn assert_exactly<const D: usize>(what: &str, ours: Tensor<D>, reference: Tensor<D>) {
    let difference = (ours - reference).abs().max().into_scalar::<f32>();
    assert_eq!(difference, 0.0, "{what}");
}

/// `true` where query `q` may not see key `k`: later keys, and keys outside a window of
/// `window` positions (the 1-D cousin of Parti's conv-shaped mask).
fn window_mask(len: usize, window: usize, device: &Device) -> Tensor<4, Bool> {
    let blocked: Vec<bool> = (0..len * len)
        .map(|i| {
            let (q, k) = (i / len, i % len);
            k > q || q - k > window
        })
        .collect();
    Tensor::<1, Bool>::from_data(blocked.as_slice(), device).reshape([1, 1, len, len])
}

/// Keys `valid..len` of each row padded, `valid` counting down from `len` per row.
fn key_padding(batch: usize, len: usize, device: &Device) -> Tensor<4, Bool> {
    let padded: Vec<bool> = (0..batch * len)
        .map(|i| i % len >= len - (i / len) % (len / 2))
        .collect();
    padding_mask(Tensor::<1, Bool>::from_data(padded.as_slice(), device).reshape([batch, len]))
}

type Attention =
    fn(Tensor<4>, Tensor<4>, Tensor<4>, Option<Tensor<4, Bool>>, &burn::nn::Dropout) -> Tensor<4>;

/// Fused and composed attention on the same inputs: output, and the gradients of a random
/// projection of it with respect to queries, keys and values.
fn check_attention(what: &str, q_len: usize, k_len: usize, mask: Option<Tensor<4, Bool>>) {
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 7);
    let (batch, heads, d_head) = (3, 4, 16);
    let queries = random([batch, heads, q_len, d_head], &device);
    let keys = random([batch, heads, k_len, d_head], &device);
    let values = random([batch, heads, k_len, d_head], &device);
    let projection = random([batch, heads, q_len, d_head], &device);
    let no_dropout = DropoutConfig::new(0.0).init();
    let run = |attention: Attention| {
        let (q, k, v) = (
            queries.clone().require_grad(),
            keys.clone().require_grad(),
            values.clone().require_grad(),
        );
        let out = attention(q.clone(), k.clone(), v.clone(), mask.clone(), &no_dropout);
        let grads = (out.clone() * projection.clone()).sum().backward();
        let grad = |x: &Tensor<4>| x.grad(&grads).expect("a gradient");
        (out.inner(), grad(&q), grad(&k), grad(&v))
    };
    let fused = run(fused::attention);
    let composed = run(fused::attention_composed);
    assert_close(&format!("{what}: output"), fused.0, composed.0);
    assert_close(&format!("{what}: d queries"), fused.1, composed.1);
    assert_close(&format!("{what}: d keys"), fused.2, composed.2);
    assert_close(&format!("{what}: d values"), fused.3, composed.3);
}

#[test]
fn attention_matches_its_composition_for_every_mask_kind() {
    let device = backend::device(&test_device()).unwrap();
    check_attention("no mask", 12, 12, None);
    check_attention("causal", 12, 12, Some(causal_mask(12, &device)));
    check_attention("window", 12, 12, Some(window_mask(12, 3, &device)));
    check_attention("key padding", 12, 12, Some(key_padding(3, 12, &device)));
    check_attention("cross, padded", 9, 14, Some(key_padding(3, 14, &device)));
}

#[test]
fn a_causal_mask_blocks_every_later_key_exactly_in_the_fused_kernel() {
    // The bias is finite (as the composition's fill), yet a blocked key's weight, and so its
    // gradient, must be exactly zero.
    let device = backend::training_device(&test_device()).unwrap();
    let keys = random([1, 2, 6, 8], &device).require_grad();
    let values = random([1, 2, 6, 8], &device).require_grad();
    let queries = random([1, 2, 6, 8], &device);
    let out = fused::attention(
        queries,
        keys.clone(),
        values.clone(),
        Some(causal_mask(6, &device)),
        &DropoutConfig::new(0.0).init(),
    );
    let grads = out.slice([0..1, 0..2, 2..3, 0..8]).sum().backward();
    for grad in [keys.grad(&grads), values.grad(&grads)] {
        let later = grad.expect("a gradient").slice([0..1, 0..2, 3..6, 0..8]);
        assert_eq!(later.abs().max().into_scalar::<f32>(), 0.0);
    }
}

#[test]
fn layer_norm_matches_its_composition_with_all_three_gradients() {
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 11);
    let mut norm = LayerNormConfig::new(24).init(&device);
    // Away from ones and zeros, so the gradients through gamma and beta are exercised.
    norm.gamma = norm.gamma.map(|_| random([24], &device).require_grad());
    let beta = norm
        .beta
        .take()
        .map(|beta| beta.map(|_| random([24], &device).require_grad()));
    norm.beta = beta;
    let input = random([4, 10, 24], &device).mul_scalar(3.0).add_scalar(1.5);
    let projection = random([4, 10, 24], &device);
    let run = |apply: fn(&burn::nn::LayerNorm, Tensor<3>) -> Tensor<3>| {
        let x = input.clone().require_grad();
        let out = apply(&norm, x.clone());
        let grads = (out.clone() * projection.clone()).sum().backward();
        let gamma = norm.gamma.val().grad(&grads).expect("d gamma");
        let beta = norm.beta.as_ref().and_then(|b| b.val().grad(&grads));
        (
            out.inner(),
            x.grad(&grads).expect("d input"),
            gamma,
            beta.expect("d beta"),
        )
    };
    let fused = run(fused::layer_norm);
    let composed = run(fused::layer_norm_composed);
    assert_close("layer norm: output", fused.0, composed.0);
    assert_close("layer norm: d input", fused.1, composed.1);
    assert_close("layer norm: d gamma", fused.2, composed.2);
    assert_close("layer norm: d beta", fused.3, composed.3);
}

#[test]
fn cross_entropy_matches_its_composition_with_its_gradient() {
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 13);
    let (batch, len, classes) = (3, 7, 50);
    let logits = random([batch, len, classes], &device).mul_scalar(4.0);
    let targets: Vec<i64> = (0..batch * len)
        .map(|i| (i * 17 % classes) as i64)
        .collect();
    let targets = Tensor::<1, Int>::from_data(targets.as_slice(), &device).reshape([batch, len]);
    let weights = random([batch, len], &device);
    let run = |loss: fn(Tensor<3>, Tensor<2, Int>) -> Tensor<2>| {
        let x = logits.clone().require_grad();
        let out = loss(x.clone(), targets.clone());
        let grads = (out.clone() * weights.clone()).sum().backward();
        (out.inner(), x.grad(&grads).expect("d logits"))
    };
    let fused = run(fused::cross_entropy);
    let composed = run(fused::cross_entropy_composed);
    assert_close("cross-entropy: losses", fused.0, composed.0);
    assert_close("cross-entropy: d logits", fused.1, composed.1);
}

#[test]
fn gelu_backward_matches_the_exact_gelu_derivative() {
    // GELU is fused by Burn itself (its autodiff calls the backend's gelu_backward, libtorch's
    // kernel on tch); held here against the erf formula's derivative.
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 17);
    let x = random([5, 40], &device).mul_scalar(3.0).require_grad();
    let grads = gelu(x.clone()).sum().backward();
    let input = x.clone().inner();
    let cdf = input
        .clone()
        .div_scalar(std::f64::consts::SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    let pdf = input
        .clone()
        .powi_scalar(2)
        .mul_scalar(-0.5)
        .exp()
        .div_scalar((2.0 * std::f64::consts::PI).sqrt());
    let expected = cdf + input * pdf;
    assert_close("gelu: d input", x.grad(&grads).expect("d input"), expected);
}

/// How a linear layer's gradients are asked for.
#[derive(Debug, Clone, Copy)]
enum LinearCase {
    /// Input and parameters, through a random projection of the output.
    Everything,
    /// An input that needs no gradient (a model's first layer): the parameters' only.
    ParametersOnly,
    /// A frozen layer (the ViT-VQGAN encoder under decoder fine-tuning): the input's only.
    InputOnly,
    /// Everything, from the plain sum of the output: a gradient of ones, broadcast (stride 0).
    Summed,
}

/// Fused and composed linear layer on inputs of `shape`, in every [`LinearCase`]: the output,
/// and each gradient asked for (and none that was not).
fn check_linear<const D: usize>(what: &str, shape: [usize; D]) {
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 23);
    let d_output = 10;
    let mut layer: Linear = LinearConfig::new(shape[D - 1], d_output).init(&device);
    let bias = layer
        .bias
        .take()
        .map(|bias| bias.map(|_| random([d_output], &device).require_grad()));
    layer.bias = bias;
    let input = random(shape, &device).mul_scalar(2.0);
    let mut output_shape = shape;
    output_shape[D - 1] = d_output;
    let projection = random(output_shape, &device);
    type Gradients<const D: usize> = (
        Tensor<D>,
        Option<Tensor<D>>,
        Option<Tensor<2>>,
        Option<Tensor<1>>,
    );
    let run = |apply: fn(&Linear, Tensor<D>) -> Tensor<D>, case: LinearCase| -> Gradients<D> {
        let layer = match case {
            LinearCase::InputOnly => layer.clone().no_grad(),
            _ => layer.clone(),
        };
        let x = match case {
            LinearCase::ParametersOnly => input.clone(),
            _ => input.clone().require_grad(),
        };
        let out = apply(&layer, x.clone());
        let grads = match case {
            LinearCase::Summed => out.clone().sum().backward(),
            _ => (out.clone() * projection.clone()).sum().backward(),
        };
        let weight = layer.weight.val().grad(&grads);
        let bias = layer.bias.as_ref().and_then(|b| b.val().grad(&grads));
        (out.inner(), x.grad(&grads), weight, bias)
    };
    for case in [
        LinearCase::Everything,
        LinearCase::ParametersOnly,
        LinearCase::InputOnly,
        LinearCase::Summed,
    ] {
        let (fused, composed) = (run(fused::linear, case), run(fused::linear_composed, case));
        let what = format!("{what}, {case:?}");
        assert_close(&format!("{what}: output"), fused.0, composed.0);
        let wanted = (
            !matches!(case, LinearCase::ParametersOnly),
            !matches!(case, LinearCase::InputOnly),
        );
        let got = (fused.1.is_some(), fused.2.is_some() && fused.3.is_some());
        assert_eq!(got, wanted, "{what}: which gradients (input, parameters)");
        if let (Some(ours), Some(reference)) = (fused.1, composed.1) {
            assert_close(&format!("{what}: d input"), ours, reference);
        }
        if let (Some(ours), Some(reference)) = (fused.2, composed.2) {
            assert_close(&format!("{what}: d weight"), ours, reference);
        }
        if let (Some(ours), Some(reference)) = (fused.3, composed.3) {
            assert_close(&format!("{what}: d bias"), ours, reference);
        }
    }
}

#[test]
fn linear_matches_its_composition_with_all_three_gradients() {
    check_linear("rows", [9, 24]);
    check_linear("a batch of sequences", [4, 7, 24]);
    check_linear("a batch of grids", [2, 3, 4, 24]);
    check_linear("one vector", [24]);
}

/// bf16 keeps 8 bits of mantissa: each value of `ours` within 2% of `reference`'s largest.
/// Returns the largest difference.
#[track_caller]
fn within_bf16<const D: usize>(what: &str, ours: Tensor<D>, reference: Tensor<D>) -> f32 {
    let scale = reference.clone().abs().max().into_scalar::<f32>();
    let difference = (ours.cast(burn::tensor::DType::F32) - reference)
        .abs()
        .max()
        .into_scalar::<f32>();
    assert!(
        difference <= 2e-2 * scale,
        "{what}: bf16 differs from f32 by {difference} (values up to {scale})"
    );
    difference
}

/// [`within_bf16`], and not equal to the f32 result either: autocast did engage.
#[track_caller]
fn engaged_within_bf16<const D: usize>(what: &str, ours: Tensor<D>, reference: Tensor<D>) {
    let difference = within_bf16(what, ours, reference);
    assert!(difference > 0.0, "{what}: bf16 changed nothing");
}

/// bf16 autocast (`tch`): the fused linear multiplies in bf16 and returns bf16, as PyTorch's
/// `linear` does under autocast, and its parameters' gradients come back in f32; all within
/// bf16 rounding of the f32 results. On `flex` autocast is refused.
#[test]
fn linear_under_bf16_autocast_multiplies_in_bf16_and_keeps_f32_gradients() {
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::DType;
    use fused::{Autocast, Precision};
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 29);
    let layer: Linear = LinearConfig::new(32, 16).init(&device);
    let input = random([3, 5, 32], &device);
    let projection = random([3, 5, 16], &device);
    let run = |precision: Precision| {
        let _autocast = Autocast::begin(precision, &test_device()).unwrap();
        let x = input.clone().require_grad();
        let out = fused::linear(&layer, x.clone());
        let dtype = out.dtype();
        let grads = (out.clone().cast(DType::F32) * projection.clone())
            .sum()
            .backward();
        let weight = layer.weight.val().grad(&grads).expect("d weight");
        let bias = layer.bias.as_ref().and_then(|b| b.val().grad(&grads));
        let d_input = x.grad(&grads).expect("d input");
        (dtype, out.inner(), d_input, weight, bias.expect("d bias"))
    };
    if !cfg!(feature = "tch") {
        assert!(Autocast::begin(Precision::Bf16, "cpu").is_err());
        return;
    }
    let (dtype, out, d_input, d_weight, d_bias) = run(Precision::Bf16);
    let reference = run(Precision::F32);
    assert_eq!(reference.0, DType::F32);
    if fused::enabled() {
        assert_eq!(dtype, DType::BF16, "the product's kind under autocast");
        assert_eq!(d_weight.dtype(), DType::F32, "d weight's kind");
        assert_eq!(d_bias.dtype(), DType::F32, "d bias's kind");
        assert_eq!(d_input.dtype(), DType::F32, "d input's kind (the input's)");
    }
    engaged_within_bf16("output", out, reference.1);
    within_bf16("d input", d_input, reference.2);
    within_bf16("d weight", d_weight, reference.3);
    within_bf16("d bias", d_bias, reference.4);
}

/// `fused::add` of an f32 and a bf16 tensor (`tch`): the f32 sum, as PyTorch promotes, and the
/// gradient handed to each operand in its own dtype, unrounded for the f32 one. Equal dtypes, and
/// every `flex` case: Burn's add, exactly.
#[test]
fn add_of_f32_and_bf16_sums_in_f32_and_returns_each_gradient_in_its_operands_dtype() {
    use burn::tensor::DType;
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 31);
    let (x, y) = (random([4, 6, 8], &device), random([4, 6, 8], &device));
    assert_exactly(
        "equal dtypes",
        fused::add(x.clone(), y.clone()),
        x.clone() + y.clone(),
    );
    if !cfg!(feature = "tch") {
        return;
    }
    let projection = random([4, 6, 8], &device);
    let x = x.require_grad();
    let y = y.cast(DType::BF16).require_grad();
    let sum = fused::add(x.clone(), y.clone());
    assert_eq!(sum.dtype(), DType::F32, "the sum's dtype");
    let expected = x.clone().inner() + y.clone().inner().cast(DType::F32);
    assert_exactly("the sum", sum.clone().inner(), expected);
    let grads = (sum * projection.clone()).sum().backward();
    let (d_x, d_y) = (x.grad(&grads).unwrap(), y.grad(&grads).unwrap());
    assert_eq!((d_x.dtype(), d_y.dtype()), (DType::F32, DType::BF16));
    let projection = projection.inner();
    assert_exactly("d x", d_x, projection.clone());
    let rounded = projection.clone().cast(DType::BF16).cast(DType::F32);
    assert_exactly("d y", d_y.cast(DType::F32), rounded);

    // Broadcast, as the learned positions are added: a bf16 batch plus f32 rows `[1, 6, 8]`,
    // whose gradient is the sum over the batch.
    let batch = random([4, 6, 8], &device).cast(DType::BF16).require_grad();
    let rows = random([1, 6, 8], &device).require_grad();
    let sum = fused::add(batch.clone(), rows.clone());
    assert_eq!((sum.dtype(), sum.dims()), (DType::F32, [4, 6, 8]));
    let grads = (sum * Tensor::from_inner(projection.clone()))
        .sum()
        .backward();
    let (d_batch, d_rows) = (batch.grad(&grads).unwrap(), rows.grad(&grads).unwrap());
    assert_eq!((d_batch.dtype(), d_batch.dims()), (DType::BF16, [4, 6, 8]));
    assert_eq!((d_rows.dtype(), d_rows.dims()), (DType::F32, [1, 6, 8]));
    assert_close("d rows", d_rows, projection.sum_dim(0));
}

/// A Transformer block under bf16 autocast (`tch`) keeps its residual stream in f32, as PyTorch's
/// autocast and Parti do: an f32 input comes out f32 with an f32 gradient, each within bf16
/// rounding of the f32 run. (Before `fused::add`, burn-tch's in-place add made it bf16.)
#[test]
fn a_transformer_block_under_bf16_autocast_keeps_its_residual_stream_in_f32() {
    use burn::tensor::DType;
    use fused::{Autocast, Precision};
    use nn::block::TransformerBlockConfig;
    if !cfg!(feature = "tch") {
        return; // autocast is libtorch's (refused on flex: the linear test checks that)
    }
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 37);
    let block = TransformerBlockConfig::new(32, 4, 64).init(&device);
    let input = random([2, 6, 32], &device);
    let projection = random([2, 6, 32], &device);
    let mask = causal_mask(6, &device);
    let run = |precision: Precision| {
        let _autocast = Autocast::begin(precision, &test_device()).unwrap();
        let x = input.clone().require_grad();
        let out = block.forward(x.clone(), Some(mask.clone()), None);
        let grads = (out.clone() * projection.clone()).sum().backward();
        let gamma = block.norm_mlp.gamma.val().grad(&grads).unwrap();
        (out.inner(), x.grad(&grads).unwrap(), gamma)
    };
    let (out, d_input, d_gamma) = run(Precision::Bf16);
    let reference = run(Precision::F32);
    assert_eq!(
        out.dtype(),
        DType::F32,
        "the block's output (the residual stream)"
    );
    if fused::enabled() {
        // Burn's composed linear hands its f32 input a bf16 gradient, which reaches the gain
        // and, through burn-tch's in-place adds, may reach the stream's gradient.
        assert_eq!(d_input.dtype(), DType::F32, "the stream's gradient");
        assert_eq!(d_gamma.dtype(), DType::F32, "a layer norm's gradient");
    }
    engaged_within_bf16("output", out, reference.0);
    within_bf16("d input", d_input, reference.1);
    within_bf16("d layer norm gain", d_gamma, reference.2);
}

#[test]
fn adamw_matches_burns_adamw_over_several_steps() {
    // On tch the step is libtorch's fused kernel; Burn's AdamW is the reference (on flex both
    // sides are Burn's).
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamWConfig, GradientsParams};
    let device = backend::training_device(&test_device()).unwrap();
    let _seeded = backend::seed_exclusively(&device, 19);
    let initial: Linear = LinearConfig::new(12, 6).init(&device);
    let inputs: Vec<Tensor<2>> = (0..5).map(|_| random([8, 12], &device)).collect();
    let settings = nn::fused::AdamW {
        beta_1: 0.8,
        beta_2: 0.95,
        epsilon: 1e-6,
        weight_decay: 0.1,
        grad_clip_norm: None,
    };
    let mut fused = settings.init();
    let mut reference = AdamWConfig::new()
        .with_beta_1(0.8)
        .with_beta_2(0.95)
        .with_epsilon(1e-6)
        .with_weight_decay(0.1)
        .init();
    let (mut ours, mut theirs) = (initial.clone(), initial);
    for (step, x) in inputs.iter().enumerate() {
        let grads = |model: &Linear| {
            let loss = model.forward(x.clone()).powi_scalar(2).mean();
            GradientsParams::from_grads(loss.backward(), model)
        };
        let lr = 0.05 / (step + 1) as f64;
        let (g_ours, g_theirs) = (grads(&ours), grads(&theirs));
        ours = fused.step(lr, ours, g_ours);
        theirs = reference.step(lr, theirs, g_theirs);
    }
    assert_close(
        "adamw: weight",
        ours.weight.val().inner(),
        theirs.weight.val().inner(),
    );
    let bias = |model: &Linear| {
        model
            .bias
            .as_ref()
            .map(|b| b.val().inner())
            .expect("a bias")
    };
    assert_close("adamw: bias", bias(&ours), bias(&theirs));
    // The state is Burn's AdamW state: a record of one loads into the other, and the next step
    // agrees.
    let mut swapped = AdamWConfig::new()
        .with_beta_1(0.8)
        .with_beta_2(0.95)
        .with_epsilon(1e-6)
        .with_weight_decay(0.1)
        .init()
        .load_record(fused.to_record());
    let x = random([8, 12], &device);
    let grads = |model: &Linear| {
        let loss = model.forward(x.clone()).powi_scalar(2).mean();
        GradientsParams::from_grads(loss.backward(), model)
    };
    let (g_ours, g_theirs) = (grads(&ours), grads(&ours));
    let next_fused = fused.step(0.01, ours.clone(), g_ours);
    let next_swapped = swapped.step(0.01, ours, g_theirs);
    assert_close(
        "adamw: step after a record swap",
        next_fused.weight.val().inner(),
        next_swapped.weight.val().inner(),
    );
}

#[test]
fn gelu_outside_autodiff_is_within_f32_rounding_of_the_exact_one_and_training_keeps_burns() {
    let device = backend::device("cpu").unwrap();
    // Every region of erf: the linear middle, the bend, the tails where it reaches +-1.
    let values: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 / 1000.0).collect();
    let x = Tensor::<1>::from_floats(values.as_slice(), &device);
    let ours = fused::gelu(x.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let exact = gelu(x).into_data().try_to_vec::<f32>().unwrap();
    for ((&v, &a), &b) in values.iter().zip(&ours).zip(&exact) {
        assert!(
            (a - b).abs() <= 1e-6 * (1.0 + v.abs()),
            "gelu({v}): {a} against {b}"
        );
    }
    // On the training device (and on tch everywhere) it is Burn's GELU, value for value.
    let training = backend::training_device("cpu").unwrap();
    let x = random([4, 33], &training);
    let ours = fused::gelu(x.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let burns = gelu(x).into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(ours, burns);
    // erf itself: odd, 0 at 0, +-1 in the tails.
    assert_eq!(fused::erf_rational(0.0), 0.0);
    assert_eq!(fused::erf_rational(-1.3), -fused::erf_rational(1.3));
    assert!((fused::erf_rational(9.0) - 1.0).abs() < 4e-7);
    assert!((fused::erf_rational(0.5) - 0.520_499_9).abs() < 4e-7);
}

/// A tensor's values as f32, in order.
#[cfg(feature = "tch")]
fn f32_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

/// A libtorch tensor's values as f32, in order.
#[cfg(feature = "tch")]
fn torch_values(tensor: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(tensor.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap()
}

/// Layer norm and cross-entropy on `tch` compute their backward directly, with no pass through
/// libtorch's autograd engine, so they must run the kernels PyTorch's autograd runs: every value
/// and gradient equal, bit for bit, to `layer_norm` and `cross_entropy` differentiated by libtorch
/// itself on the same numbers, in f32 and under the CPU's bf16 autocast (bf16 logits, as the
/// output head gives them there; a bf16 input to the layer norm), each gradient in its operand's
/// kind. (CUDA's autocast casts elsewhere; `fused::libtorch`'s unit tests run its order of casts.)
#[cfg(feature = "tch")]
#[test]
fn layer_norm_and_cross_entropy_on_tch_are_pytorchs_kernels_bit_for_bit() {
    use burn::tensor::DType;
    use fused::{Autocast, Precision};
    if !fused::enabled() {
        return;
    }
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 31);
    let values = f32_values::<3>;
    let torch = |data: &[f32], shape: &[i64], kind: tch::Kind| {
        tch::Tensor::from_slice(data).reshape(shape).to_kind(kind)
    };
    let (batch, len, width, classes) = (3, 5, 24, 40);
    let input = values(
        random([batch, len, width], &device)
            .mul_scalar(3.0)
            .add_scalar(1.5),
    );
    let projection = values(random([batch, len, width], &device));
    let gamma = values(random([1, 1, width], &device));
    let beta = values(random([1, 1, width], &device));
    let logits = values(random([batch, len, classes], &device).mul_scalar(4.0));
    let weights = values(random([1, batch, len], &device));
    let targets: Vec<i64> = (0..batch * len).map(|i| (i * 7 % classes) as i64).collect();
    let shape = [batch as i64, len as i64];
    for (precision, half) in [(Precision::F32, DType::F32), (Precision::Bf16, DType::BF16)] {
        let _autocast = Autocast::begin(precision, "cpu").unwrap();
        let kind = if half == DType::F32 {
            tch::Kind::Float
        } else {
            tch::Kind::BFloat16
        };

        // Ours.
        let burn_tensor =
            |data: &[f32], dims: [usize; 3]| Tensor::<1>::from_data(data, &device).reshape(dims);
        let mut norm = LayerNormConfig::new(width).init(&device);
        norm.gamma = norm.gamma.map(|_| {
            burn_tensor(&gamma, [1, 1, width])
                .reshape([width])
                .require_grad()
        });
        norm.beta = norm.beta.take().map(|b| {
            b.map(|_| {
                burn_tensor(&beta, [1, 1, width])
                    .reshape([width])
                    .require_grad()
            })
        });
        let x = burn_tensor(&input, [batch, len, width])
            .cast(half)
            .require_grad();
        let normed = fused::layer_norm(&norm, x.clone());
        let grads = (normed.clone().cast(DType::F32)
            * burn_tensor(&projection, [batch, len, width]))
        .sum()
        .backward();
        assert_eq!(
            x.grad(&grads).unwrap().dtype(),
            half,
            "d input's kind, the input's ({precision:?})"
        );
        assert_eq!(
            norm.gamma.val().grad(&grads).unwrap().dtype(),
            DType::F32,
            "d gamma's kind ({precision:?})"
        );
        let ours_norm = [
            values(normed.inner()),
            values(x.grad(&grads).unwrap()),
            values(
                norm.gamma
                    .val()
                    .grad(&grads)
                    .unwrap()
                    .reshape([1, 1, width]),
            ),
            values(
                norm.beta
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&grads)
                    .unwrap()
                    .reshape([1, 1, width]),
            ),
        ];
        let z = burn_tensor(&logits, [batch, len, classes])
            .cast(half)
            .require_grad();
        let burn_targets =
            Tensor::<1, Int>::from_data(targets.as_slice(), &device).reshape([batch, len]);
        let losses = fused::cross_entropy(z.clone(), burn_targets);
        let grads = (losses.clone() * burn_tensor(&weights, [1, batch, len]).reshape([batch, len]))
            .sum()
            .backward();
        assert_eq!(
            z.grad(&grads).unwrap().dtype(),
            half,
            "d logits' kind, the logits' ({precision:?})"
        );
        assert_eq!(
            losses.dtype(),
            DType::F32,
            "the losses' kind ({precision:?})"
        );
        let ours_loss = [
            values(losses.inner().unsqueeze()),
            values(z.grad(&grads).unwrap()),
        ];

        // libtorch's autograd, on the same numbers.
        let x = torch(&input, &[3, 5, 24], kind).set_requires_grad(true);
        let (g, b) = (
            torch(&gamma, &[24], tch::Kind::Float).set_requires_grad(true),
            torch(&beta, &[24], tch::Kind::Float).set_requires_grad(true),
        );
        let normed = x.layer_norm([24], Some(&g), Some(&b), fused::LAYER_NORM_EPSILON, true);
        (normed.to_kind(tch::Kind::Float) * torch(&projection, &[3, 5, 24], tch::Kind::Float))
            .sum(tch::Kind::Float)
            .backward();
        let theirs_norm = [&normed, &x.grad(), &g.grad(), &b.grad()].map(torch_values);
        let z = torch(&logits, &[3, 5, 40], kind).set_requires_grad(true);
        let losses = z
            .reshape([-1, 40])
            .cross_entropy_loss::<tch::Tensor>(
                &tch::Tensor::from_slice(&targets),
                None,
                tch::Reduction::None,
                -100,
                0.0,
            )
            .reshape(shape);
        (&losses * torch(&weights, &shape, tch::Kind::Float))
            .sum(tch::Kind::Float)
            .backward();
        let theirs_loss = [&losses, &z.grad()].map(torch_values);

        for (what, ours, theirs) in [
            ("layer norm", &ours_norm[0], &theirs_norm[0]),
            ("layer norm: d input", &ours_norm[1], &theirs_norm[1]),
            ("layer norm: d gamma", &ours_norm[2], &theirs_norm[2]),
            ("layer norm: d beta", &ours_norm[3], &theirs_norm[3]),
            ("cross-entropy", &ours_loss[0], &theirs_loss[0]),
            ("cross-entropy: d logits", &ours_loss[1], &theirs_loss[1]),
        ] {
            assert_eq!(ours, theirs, "{what} ({precision:?})");
        }
    }
}

/// Attention on `tch` runs the graph libtorch records for its SDPA through
/// `csrc/autograd.cpp`, node by node, instead of through libtorch's autograd engine: the same
/// nodes, so its output and every gradient must equal SDPA differentiated by libtorch itself
/// (`backward()` through the engine) on the same numbers, bit for bit, for every mask kind, in
/// f32 and under the CPU's bf16 autocast (f32 inputs, so the graph holds autocast's casts ahead
/// of the kernel's node, and each gradient comes back in f32).
#[cfg(feature = "tch")]
#[test]
fn attention_on_tch_is_pytorchs_sdpa_and_its_autograd_bit_for_bit() {
    use burn::tensor::DType;
    use fused::{Autocast, Precision};
    if !fused::enabled() {
        return;
    }
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 37);
    let values = f32_values::<4>;
    let shape_of = |dims: [usize; 4]| dims.map(|d| d as i64);
    let (batch, heads, d_head) = (3, 4, 16);
    let masks: [(&str, usize, usize, Option<Tensor<4, Bool>>); 5] = [
        ("no mask", 12, 12, None),
        ("causal", 12, 12, Some(causal_mask(12, &device))),
        ("window", 12, 12, Some(window_mask(12, 3, &device))),
        ("key padding", 12, 12, Some(key_padding(3, 12, &device))),
        ("cross, padded", 9, 14, Some(key_padding(3, 14, &device))),
    ];
    for (what, q_len, k_len, mask) in masks {
        let q_dims = [batch, heads, q_len, d_head];
        let k_dims = [batch, heads, k_len, d_head];
        let inputs = [q_dims, k_dims, k_dims].map(|dims| values(random(dims, &device)));
        let projection = values(random(q_dims, &device));
        let blocked = mask.as_ref().map(|mask| {
            let dims = mask.dims();
            let flags = mask.clone().into_data().try_to_vec::<bool>().unwrap();
            (flags, dims)
        });
        for precision in [Precision::F32, Precision::Bf16] {
            let _autocast = Autocast::begin(precision, "cpu").unwrap();
            let case = format!("{what} ({precision:?})");

            // Ours.
            let burn = |data: &[f32], dims: [usize; 4]| {
                Tensor::<1>::from_data(data, &device).reshape(dims)
            };
            let [q, k, v] = [
                burn(&inputs[0], q_dims),
                burn(&inputs[1], k_dims),
                burn(&inputs[2], k_dims),
            ]
            .map(|x| x.require_grad());
            let out = fused::attention(
                q.clone(),
                k.clone(),
                v.clone(),
                mask.clone(),
                &DropoutConfig::new(0.0).init(),
            );
            let grads = (out.clone().cast(DType::F32) * burn(&projection, q_dims))
                .sum()
                .backward();
            let ours = [
                values(out.inner()),
                values(q.grad(&grads).unwrap()),
                values(k.grad(&grads).unwrap()),
                values(v.grad(&grads).unwrap()),
            ];

            // libtorch's autograd, on the same numbers and the same additive bias.
            let torch = |data: &[f32], dims: [usize; 4]| {
                tch::Tensor::from_slice(data).reshape(shape_of(dims))
            };
            let [q, k, v] = [
                torch(&inputs[0], q_dims),
                torch(&inputs[1], k_dims),
                torch(&inputs[2], k_dims),
            ]
            .map(|x| x.set_requires_grad(true));
            let bias = blocked.as_ref().map(|(flags, dims)| {
                tch::Tensor::from_slice(flags)
                    .reshape(shape_of(*dims))
                    .to_kind(tch::Kind::Float)
                    * f64::from(fused::BLOCKED)
            });
            let scale = 1.0 / (d_head as f64).sqrt();
            let out = tch::Tensor::scaled_dot_product_attention(
                &q, &k, &v, bias, 0.0, false, scale, false,
            );
            (out.to_kind(tch::Kind::Float) * torch(&projection, q_dims))
                .sum(tch::Kind::Float)
                .backward();
            let theirs = [&out, &q.grad(), &k.grad(), &v.grad()].map(torch_values);

            for (part, ours, theirs) in [
                ("output", &ours[0], &theirs[0]),
                ("d queries", &ours[1], &theirs[1]),
                ("d keys", &ours[2], &theirs[2]),
                ("d values", &ours[3], &theirs[3]),
            ] {
                assert_eq!(ours, theirs, "{case}: {part}");
            }
            if precision == Precision::Bf16 {
                assert_ne!(
                    ours[0],
                    torch_values(&tch::no_grad(|| {
                        let _off = Autocast::pause();
                        tch::Tensor::scaled_dot_product_attention(
                            &q.detach(),
                            &k.detach(),
                            &v.detach(),
                            None::<tch::Tensor>,
                            0.0,
                            false,
                            scale,
                            false,
                        )
                    })),
                    "{case}: autocast engaged"
                );
            }
        }
    }
}
