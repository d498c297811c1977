//! The Transformer's hot operations, each one fused kernel forward and backward where the backend
//! has one.
//!
//! Burn 0.22's autodiff has no backward of its own for attention, layer norm or softmax, so under
//! it each becomes several ops, and attention materialises its `[heads, n, n]` scores in both
//! directions. On `tch`, [`attention`], [`layer_norm`], [`cross_entropy`] and [`linear`] are Burn
//! custom autodiff operations (`libtorch`) that run PyTorch's own kernels both ways:
//! `scaled_dot_product_attention` (libtorch picks flash, memory-efficient or math per device, as
//! PyTorch does), `native_layer_norm`, log-softmax with `nll_loss`, and `addmm`. On `flex` they
//! are the compositions below, exactly what ran before. GELU needs nothing for training: burn-autodiff has a GELU
//! backward of its own, which burn-tch runs as libtorch's `gelu_backward`. Outside autodiff on `flex`
//! (sampling, decoding, encoding, held-out evaluation) [`gelu`] evaluates erf as a rational
//! function that the compiler vectorises, as PyTorch's and Eigen's CPU kernels do, instead of
//! flex's one-value-at-a-time libm call.
//!
//! Under bf16 autocast a product returns bf16 and [`add`] joins it to an f32 residual stream in
//! f32, as PyTorch's add promotes (Burn's add on `tch` would keep the bf16 operand's dtype).
//!
//! Training steps on `tch` also take their AdamW update from one fused libtorch kernel per
//! parameter ([`AdamW`]), where Burn's AdamW runs a dozen tensor ops.
//!
//! `PARTI_FUSED=off` in the environment runs the compositions (and Burn's AdamW) on every
//! backend: an escape hatch should a kernel misbehave, and how tests compare whole training runs
//! both ways in one build.
//!
//! The `*_composed` functions are public so tests can hold each fused operation against its
//! composition, forward and backward, on the backend they were built for.

use std::sync::OnceLock;

use burn::grad_clipping::GradientClippingConfig;
use burn::nn::{Dropout, LayerNorm, Linear};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

#[cfg(feature = "tch")]
mod libtorch;

/// Blocked scores are set to this rather than -inf, so a row with every key blocked (a padded
/// query) stays finite; softmax still gives blocked keys a weight of exactly 0 elsewhere. The
/// fused kernel adds it as a bias, to the same effect.
pub const BLOCKED: f32 = -1.0e9;

/// The epsilon of every layer norm in parti (Burn's default, which no config changes; Burn keeps
/// a module's own epsilon private).
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// Whether `PARTI_FUSED` is `off` or `0` (read once: [`gelu`] asks on every call).
fn turned_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| matches!(std::env::var("PARTI_FUSED").as_deref(), Ok("off" | "0")))
}

/// Whether the fused kernels run: on `tch`, unless `PARTI_FUSED` is `off` or `0`.
pub fn enabled() -> bool {
    cfg!(feature = "tch") && !turned_off()
}

/// GELU, `x * (1 + erf(x / sqrt 2)) / 2`. Under autodiff, and on `tch`, Burn's own (exact erf,
/// with its gradient). Outside autodiff on `flex`, [`erf_rational`] over the values: flex's
/// scalar libm erf was a fifth of a batched decode's time on the CPU (BENCHMARKS.md, "Serving");
/// the rational form is within 4e-7 of erf, a few units in the last place of f32.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let vectorised = cfg!(not(feature = "tch")) && !turned_off();
    if !vectorised || x.device().is_autodiff() || x.dtype() != DType::F32 {
        return burn::tensor::activation::gelu(x);
    }
    let (shape, device) = (x.shape(), x.device());
    let data = x.into_data();
    let Ok(values) = data.as_slice::<f32>() else {
        return burn::tensor::activation::gelu(Tensor::from_data(data, &device));
    };
    let activated: Vec<f32> = values
        .iter()
        .map(|&v| 0.5 * v * (1.0 + erf_rational(v * std::f32::consts::FRAC_1_SQRT_2)))
        .collect();
    Tensor::from_data(TensorData::new(activated, shape), &device)
}

/// erf as Eigen's and XLA's single-precision rational approximation: odd degree-13 over even
/// degree-8 polynomials on [-4, 4], where erf reaches +-1 in f32. No branch and no exp, so a
/// loop over it vectorises.
pub fn erf_rational(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ]
    .iter()
    .fold(0.0f32, |acc, &c| acc * x2 + c)
        * x;
    let q = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_474e-2,
    ]
    .iter()
    .fold(0.0f32, |acc, &c| acc * x2 + c);
    p / q
}

/// Scaled dot-product attention of `queries: [batch, heads, q, d_head]` over
/// `keys`/`values: [batch, heads, k, d_head]`; `mask` is broadcastable to `[batch, heads, q, k]`,
/// `true` blocking a query from a key. `dropout` applies to the attention weights: while it is
/// active (a rate above zero, in training) the composition runs, so its draws come from Burn's
/// seeded generator as before.
pub fn attention(
    queries: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    dropout: &Dropout,
) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if enabled() && (dropout.prob == 0.0 || !queries.device().is_autodiff()) {
        return libtorch::attention(queries, keys, values, mask);
    }
    attention_composed(queries, keys, values, mask, dropout)
}

/// [`attention`] as separate ops: scores, mask, softmax, dropout, weighted sum.
pub fn attention_composed(
    queries: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    dropout: &Dropout,
) -> Tensor<4> {
    let d_head = queries.dims()[3];
    let scores = queries
        .matmul(keys.swap_dims(2, 3))
        .mul_scalar(1.0 / (d_head as f64).sqrt());
    let scores = match mask {
        Some(mask) => {
            let shape = scores.dims();
            scores.mask_fill(mask.expand(shape), BLOCKED)
        }
        None => scores,
    };
    dropout.forward(softmax(scores, 3)).matmul(values)
}

/// `norm` applied over the last dimension of `x`.
pub fn layer_norm<const D: usize>(norm: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if let (true, Some(beta)) = (enabled(), &norm.beta) {
        return libtorch::layer_norm(x, norm.gamma.val(), beta.val());
    }
    layer_norm_composed(norm, x)
}

/// [`layer_norm`] as Burn composes it.
pub fn layer_norm_composed<const D: usize>(norm: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    norm.forward(x)
}

/// `layer` applied to `x: [.., d_input]`. On `tch` with a bias: one libtorch `addmm` forward (the
/// bias enters the product instead of a separate pass; under bf16 autocast the result is bf16,
/// as PyTorch's `linear` returns) and its backward written out: two products and a sum, each
/// gradient in its operand's dtype as PyTorch's autocast gives them (Burn's own linear hands an
/// f32 input a bf16 gradient under autocast).
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if let (true, Some(bias)) = (enabled(), &layer.bias) {
        let d_input = layer.weight.dims()[0];
        assert_eq!(
            x.dims()[D - 1],
            d_input,
            "a linear layer of {d_input} inputs was given {:?}",
            x.dims()
        );
        return libtorch::linear(x, layer.weight.val(), bias.val());
    }
    linear_composed(layer, x)
}

/// `x + y` in the wider of their dtypes, as PyTorch adds (dimensions of size 1 broadcast, as in
/// Burn's add). Under bf16 autocast a residual stream kept in f32 plus a branch a bf16 product
/// returned stays f32, and every layer norm reading the stream reads f32 (as Parti trained); the
/// branch's gradient reaches it in bf16. Burn's add on `tch` writes into whichever operand it
/// owns and keeps that one's dtype, which made the stream bf16 from the first block on. Operands
/// of one dtype (always, outside autocast, and always on `flex`) take Burn's add.
pub fn add<const D: usize>(x: Tensor<D>, y: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if x.dtype() != y.dtype() {
        return libtorch::promoting_add(x, y);
    }
    x + y
}

/// `x` in `dtype`: itself where it already is (every f32 run, and `flex`), else cast, its
/// gradient cast back. For f32 work that meets a bf16 autocast output, where PyTorch's ops would
/// promote to f32 (the ViT-VQGAN's quantizer and pixel losses): burn-tch's binary ops keep the
/// dtype of whichever operand they own, so without it the dtype would hang on ownership.
pub fn to_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// [`linear`] as Burn computes it.
pub fn linear_composed<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    layer.forward(x)
}

/// The cross-entropy of each position: `logits: [batch, len, classes]`, `targets: [batch, len]`
/// -> `-log softmax(logits)[target]`, `[batch, len]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    #[cfg(feature = "tch")]
    if enabled() {
        return libtorch::cross_entropy(logits, targets);
    }
    cross_entropy_composed(logits, targets)
}

/// [`cross_entropy`] as log-softmax, gather and negation.
pub fn cross_entropy_composed(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [batch, len, _] = logits.dims();
    log_softmax(logits, 2)
        .gather(2, targets.reshape([batch, len, 1]))
        .reshape([batch, len])
        .neg()
}

/// AdamW with Burn's arithmetic and state (checkpoints hold Burn's `AdamWState` either way); on
/// `tch` each parameter's step is libtorch's fused kernel (`torch.optim.AdamW(fused=True)`), one
/// pass over the parameter, its gradient and both moments.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// Clips each parameter's gradient to this L2 norm, tensor by tensor (Burn's norm clipping),
    /// not the norm of all gradients together as `torch.nn.utils.clip_grad_norm_` does.
    pub grad_clip_norm: Option<f32>,
}

impl Default for AdamW {
    /// Burn's `AdamWConfig` defaults.
    fn default() -> Self {
        AdamW {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 1e-4,
            grad_clip_norm: None,
        }
    }
}

impl AdamW {
    pub fn init(&self) -> ModuleOptimizer {
        let clipping = self.grad_clip_norm.map(GradientClippingConfig::Norm);
        #[cfg(feature = "tch")]
        if enabled() {
            let optimizer = ModuleOptimizer::from(libtorch::FusedAdamW {
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
            });
            return match clipping {
                Some(clipping) => optimizer.with_grad_clipping(clipping.init()),
                None => optimizer,
            };
        }
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
            .with_grad_clipping(clipping)
            .init()
    }
}

/// The arithmetic of a training step's forward and backward passes (the config key `precision`
/// of `train parti`, `vqgan train` and `vqgan finetune-decoder`'s `[train]`; `--precision` of the
/// `bench` subcommands).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// libtorch's bf16 autocast (`tch` only), as Parti trained: matrix products and attention
    /// in bf16, layer norm, softmax and the losses in f32, parameters, gradients and optimizer
    /// state in f32.
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// Whether this build can train in `self`: bf16 needs libtorch's autocast. Stages call it
    /// before any work, so a wrong build is refused at once, saying what to do.
    pub fn check_backend(&self) -> Result<(), crate::Error> {
        if self.is_f32() || cfg!(feature = "tch") {
            Ok(())
        } else {
            Err(crate::Error::Usage(BF16_NEEDS_TCH.into()))
        }
    }
}

const BF16_NEEDS_TCH: &str = "precision bf16 needs the tch backend (libtorch's autocast): build \
     with --features nn/tch (make ... BACKEND=tch), or set precision = \"f32\"";

/// bf16 autocast on this thread while it lives ([`Precision::Bf16`]); nothing for f32.
/// Autocast is per thread: the forward and backward passes it covers must run on the thread
/// that holds it (a training step with one worker per device does).
pub struct Autocast {
    /// The device kind (CUDA or not) and whether autocast was on before.
    #[cfg_attr(not(feature = "tch"), allow(dead_code))]
    restore: Option<(bool, bool)>,
}

impl Autocast {
    /// Starts `precision` for the device a `--device` value names (`cpu`, `cuda`, `cuda:N`).
    pub fn begin(precision: Precision, device: &str) -> Result<Autocast, crate::Error> {
        if precision.is_f32() {
            return Ok(Autocast { restore: None });
        }
        let cuda = crate::backend::cuda_index(device)
            .map_err(|e| crate::Error::Usage(e.to_string()))?
            .is_some();
        #[cfg(feature = "tch")]
        {
            let was_on = libtorch::set_autocast_bf16(cuda, true).map_err(crate::Error::Usage)?;
            Ok(Autocast {
                restore: Some((cuda, was_on)),
            })
        }
        #[cfg(not(feature = "tch"))]
        {
            let _ = cuda;
            Err(crate::Error::Usage(BF16_NEEDS_TCH.into()))
        }
    }

    /// Autocast off on this thread (for the CPU and CUDA, wherever it is on) while the guard
    /// lives, back on after: for work a bf16 step must do in f32 (the ViT-VQGAN's choice of
    /// codes, whose cosine similarities near 1 sit closer together than bf16 resolves, and which
    /// `vqgan encode` makes in f32).
    pub fn pause() -> AutocastPaused {
        #[cfg(feature = "tch")]
        {
            let resume = [false, true]
                .into_iter()
                .filter(|&cuda| libtorch::autocast_is_bf16(cuda))
                .filter(|&cuda| match libtorch::set_autocast_bf16(cuda, false) {
                    Ok(_) => true,
                    Err(message) => {
                        tracing::warn!("pausing bf16 autocast: {message}");
                        false
                    }
                })
                .collect();
            AutocastPaused { resume }
        }
        #[cfg(not(feature = "tch"))]
        AutocastPaused { resume: Vec::new() }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        #[cfg(feature = "tch")]
        if let Some((cuda, false)) = self.restore
            && let Err(message) = libtorch::set_autocast_bf16(cuda, false)
        {
            tracing::warn!("turning bf16 autocast back off: {message}");
        }
    }
}

/// bf16 autocast paused on this thread ([`Autocast::pause`]); back on when dropped.
pub struct AutocastPaused {
    /// The device kinds (CUDA or not) to turn autocast back on for.
    #[cfg_attr(not(feature = "tch"), allow(dead_code))]
    resume: Vec<bool>,
}

impl Drop for AutocastPaused {
    fn drop(&mut self) {
        #[cfg(feature = "tch")]
        for &cuda in &self.resume {
            if let Err(message) = libtorch::set_autocast_bf16(cuda, true) {
                tracing::warn!("resuming bf16 autocast: {message}");
            }
        }
    }
}

/// `grads` with each gradient in its parameter's dtype: under bf16 autocast a weight's gradient
/// comes out of a bf16 matrix product, and the optimizer, the accumulation over micro-batches
/// and the all-reduce keep f32, as PyTorch's autocast does.
pub fn grads_in_parameter_dtype<M: burn::module::Module>(
    model: &M,
    grads: burn::optim::GradientsParams,
) -> burn::optim::GradientsParams {
    struct Cast {
        grads: burn::optim::GradientsParams,
    }
    impl burn::module::ModuleVisitor for Cast {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let Some(grad) = self.grads.remove::<D>(param.id) else {
                return;
            };
            let dtype = param.val().dtype();
            let grad = if grad.dtype() == dtype {
                grad
            } else {
                grad.cast(dtype)
            };
            self.grads.register::<D>(param.id, grad);
        }
    }
    let mut cast = Cast { grads };
    model.visit(&mut cast);
    cast.grads
}
