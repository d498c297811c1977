#![allow(deprecated)] // burn-tch: see nn::backend for why it stays.
//! The fused operations on `tch`: a Burn backend extension implemented for `LibTorch` (inference:
//! the kernel alone) and for `Autodiff<LibTorch>` (training: a custom autodiff operation).
//!
//! Attention's training forward runs the kernel on inputs marked as requiring a gradient, so
//! libtorch records the small graph PyTorch would (autocast's casts, then the node of whichever
//! SDPA variant it picked for the device, saving the output and log-sum-exp, never the scores);
//! the backward runs that graph's nodes on Burn's incoming gradient (`csrc/autograd.cpp`).
//!
//! The linear layer, layer norm and cross-entropy compute their backward here directly on what
//! the forward kept (two products and a sum; `native_layer_norm_backward`; `nll_loss_backward`
//! and `_log_softmax_backward_data`). None of them, attention included, goes through libtorch's
//! autograd engine: a pass through it per call costs more CPU time than small steps can hide on
//! a GPU (BENCHMARKS.md, "GPU: one H200").

use std::ffi::{c_char, c_int, c_void};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, ExtensionType, LibTorch, backend_extension};
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{Bool, Device, Int, Tensor};

use super::{BLOCKED, LAYER_NORM_EPSILON};
use crate::csrc::checked;

unsafe extern "C" {
    fn parti_graph_backward(
        output: *mut c_void,
        grad_output: *mut c_void,
        inputs: *mut *mut c_void,
        count: usize,
        results: *mut *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
}

#[backend_extension(LibTorch, Autodiff)]
pub trait FusedOps: Backend {
    fn fused_attention(
        queries: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `blocked`: `true` where a query may not see a key.
    fn fused_attention_masked(
        queries: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        blocked: BoolTensor<Self>,
    ) -> FloatTensor<Self>;
    fn fused_layer_norm(
        input: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `input: [.., d_input]` times `weight: [d_input, d_output]` plus `bias: [d_output]`.
    fn fused_linear(
        input: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `lhs + rhs` in libtorch's promoted dtype, broadcasting dimensions of size 1.
    fn promoting_add(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
}

pub(super) fn attention(
    queries: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
) -> Tensor<4> {
    let (queries, keys, values) = (
        queries.into_dispatch(),
        keys.into_dispatch(),
        values.into_dispatch(),
    );
    Tensor::from_dispatch(match mask {
        Some(mask) => <Dispatch as FusedOps>::fused_attention_masked(
            queries,
            keys,
            values,
            mask.into_dispatch(),
        ),
        None => <Dispatch as FusedOps>::fused_attention(queries, keys, values),
    })
}

pub(super) fn layer_norm<const D: usize>(
    input: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
        input.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
    ))
}

pub(super) fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

pub(super) fn linear<const D: usize>(
    input: Tensor<D>,
    weight: Tensor<2>,
    bias: Tensor<1>,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
        input.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

pub(super) fn promoting_add<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::promoting_add(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
    ))
}

unsafe extern "C" {
    fn parti_autocast_is_bf16(cuda: c_int) -> c_int;
}

/// Whether bf16 autocast is on on this thread for CUDA devices (`cuda`) or the CPU.
pub(super) fn autocast_is_bf16(cuda: bool) -> bool {
    unsafe { parti_autocast_is_bf16(c_int::from(cuda)) != 0 }
}

/// The kind a linear layer multiplies in: bf16 where bf16 autocast is on for the input's device
/// (autocast casts a product's f32 and f16 operands to it), else the input's own kind.
fn linear_compute_kind(input: &tch::Tensor) -> tch::Kind {
    let floating = matches!(
        input.kind(),
        tch::Kind::Float | tch::Kind::Half | tch::Kind::BFloat16
    );
    if floating && autocast_is_bf16(input.device().is_cuda()) {
        tch::Kind::BFloat16
    } else {
        input.kind()
    }
}

/// The kernels, on libtorch tensors: PyTorch's own functional calls.
mod kernels {
    use tch::Tensor;

    /// `blocked` (`true`: a query may not see a key) goes in as the additive bias SDPA takes,
    /// finite as the composition's fill.
    pub fn attention(
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        blocked: Option<&Tensor>,
    ) -> Tensor {
        let scale = 1.0 / (queries.size()[3] as f64).sqrt();
        let bias =
            blocked.map(|blocked| blocked.to_kind(queries.kind()) * f64::from(super::BLOCKED));
        Tensor::scaled_dot_product_attention(queries, keys, values, bias, 0.0, false, scale, false)
    }

    /// `bias + input @ weight` as one `addmm` over the input's rows (the bias enters the product
    /// as its starting value instead of in a separate pass, and under bf16 the sum comes out in
    /// bf16, as PyTorch's `linear` does), with operands already in the compute kind.
    pub fn linear(input: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        let (d_input, d_output) = (weight.size()[0], weight.size()[1]);
        let mut shape = input.size();
        if let Some(last) = shape.last_mut() {
            *last = d_output;
        }
        bias.addmm(&input.reshape([-1, d_input]), weight)
            .reshape(shape)
    }
}

impl FusedOps for LibTorch {
    fn fused_attention(queries: TchTensor, keys: TchTensor, values: TchTensor) -> TchTensor {
        TchTensor::new(kernels::attention(
            &queries.tensor,
            &keys.tensor,
            &values.tensor,
            None,
        ))
    }

    fn fused_attention_masked(
        queries: TchTensor,
        keys: TchTensor,
        values: TchTensor,
        blocked: TchTensor,
    ) -> TchTensor {
        TchTensor::new(kernels::attention(
            &queries.tensor,
            &keys.tensor,
            &values.tensor,
            Some(&blocked.tensor),
        ))
    }

    fn fused_layer_norm(input: TchTensor, gamma: TchTensor, beta: TchTensor) -> TchTensor {
        TchTensor::new(layer_norm_forward([input, gamma, beta]).output)
    }

    fn fused_cross_entropy(logits: TchTensor, targets: TchTensor) -> TchTensor {
        TchTensor::new(cross_entropy_forward(&logits.tensor, &targets.tensor).0)
    }

    fn fused_linear(input: TchTensor, weight: TchTensor, bias: TchTensor) -> TchTensor {
        let kind = linear_compute_kind(&input.tensor);
        TchTensor::new(kernels::linear(
            &input.tensor.to_kind(kind),
            &weight.tensor.to_kind(kind),
            &bias.tensor.to_kind(kind),
        ))
    }

    fn promoting_add(lhs: TchTensor, rhs: TchTensor) -> TchTensor {
        TchTensor::new(&lhs.tensor + &rhs.tensor)
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<LibTorch, C> {
    fn fused_attention(
        queries: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        recorded::<C, 3>([queries, keys, values], |[q, k, v]| {
            kernels::attention(q, k, v, None)
        })
    }

    fn fused_attention_masked(
        queries: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        blocked: BoolTensor<Self>,
    ) -> FloatTensor<Self> {
        recorded::<C, 3>([queries, keys, values], |[q, k, v]| {
            kernels::attention(q, k, v, Some(&blocked.tensor))
        })
    }

    fn fused_layer_norm(
        input: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [input.node(), gamma.node(), beta.node()];
        let operands = [
            input.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        ];
        let kinds = operands.each_ref().map(|operand| operand.tensor.kind());
        let LayerNormed {
            operands: [input, gamma, beta],
            output,
            mean,
            rstd,
        } = layer_norm_forward(operands);
        direct_node::<C, _, 3>(DirectLayerNorm, nodes, TchTensor::new(output), || {
            LayerNormSaved {
                input,
                gamma,
                beta,
                mean: TchTensor::new(mean),
                rstd: TchTensor::new(rstd),
                kinds,
            }
        })
    }

    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [logits.node()];
        let logits = logits.into_primitive();
        let (logits_shape, logits_kind) = (logits.tensor.size(), logits.tensor.kind());
        let (losses, rows, targets) = cross_entropy_forward(&logits.tensor, &targets.tensor);
        direct_node::<C, _, 1>(DirectCrossEntropy, nodes, TchTensor::new(losses), || {
            CrossEntropySaved {
                log_probs: TchTensor::new(rows.log_probs),
                targets: TchTensor::new(targets),
                logits_shape,
                logits_kind,
            }
        })
    }

    fn fused_linear(
        input: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // The input is needed only for the weight's gradient, and the weight only for the
        // input's, as Burn's own linear keeps them.
        let (input_tracked, weight_tracked) = (input.is_tracked(), weight.is_tracked());
        let nodes = [input.node(), weight.node(), bias.node()];
        let (input, weight, bias) = (
            input.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
        );
        let kind = linear_compute_kind(&input.tensor);
        let (input_shape, input_kind, weight_kind, bias_kind) = (
            input.tensor.size(),
            input.tensor.kind(),
            weight.tensor.kind(),
            bias.tensor.kind(),
        );
        let (input, weight) = (in_kind(input, kind), in_kind(weight, kind));
        let output = TchTensor::new(kernels::linear(
            &input.tensor,
            &weight.tensor,
            &bias.tensor.to_kind(kind),
        ));
        direct_node::<C, _, 3>(DirectLinear, nodes, output, || LinearSaved {
            input: weight_tracked.then_some(input),
            weight: input_tracked.then_some(weight),
            input_shape,
            kind,
            input_kind,
            weight_kind,
            bias_kind,
        })
    }

    fn promoting_add(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [lhs.node(), rhs.node()];
        let (lhs, rhs) = (lhs.into_primitive(), rhs.into_primitive());
        let operands = [
            (lhs.tensor.kind(), lhs.tensor.size()),
            (rhs.tensor.kind(), rhs.tensor.size()),
        ];
        let output = LibTorch::promoting_add(lhs, rhs);
        direct_node::<C, _, 2>(PromotingAdd, nodes, output, || operands)
    }
}

/// `output` as one node of Burn's graph whose backward is `op`, with the state `saved` builds
/// (only where an input is tracked), or alone where none is.
fn direct_node<C: CheckpointStrategy, O: Backward<LibTorch, N>, const N: usize>(
    op: O,
    nodes: [NodeGuard; N],
    output: TchTensor,
    saved: impl FnOnce() -> O::State,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    match op.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(saved(), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// A sum in libtorch's promoted dtype (an f32 residual stream plus a bf16 branch gives f32) as
/// one node: the forward one out-of-place add (broadcasting as libtorch does), the backward the
/// gradient handed to each operand summed over the dimensions it was broadcast along and in its
/// own dtype (a cast for the narrower one), as PyTorch's autograd does.
#[derive(Debug)]
struct PromotingAdd;

/// Each operand's kind and shape.
type Operands = [(tch::Kind, Vec<i64>); 2];

impl Backward<LibTorch, 2> for PromotingAdd {
    type State = Operands;

    fn backward(self, ops: Ops<Operands, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        for (parent, (kind, shape)) in ops.parents.into_iter().zip(ops.state) {
            let Some(parent) = parent else { continue };
            let gradient = if grad.tensor.size() == shape && grad.tensor.kind() == kind {
                // The same tensor, shared as Burn's add shares it (burn-tch then writes into
                // neither in place).
                grad.clone()
            } else {
                TchTensor::new(grad.tensor.sum_to_size(shape.as_slice()).to_kind(kind))
            };
            grads.register::<LibTorch>(parent.id, gradient);
        }
    }
}

/// `tensor` in `kind`: the same handle when it already is (keeping its storage marked as shared
/// while held, so burn-tch never writes into it in place), else a new tensor.
fn in_kind(tensor: TchTensor, kind: tch::Kind) -> TchTensor {
    if tensor.tensor.kind() == kind {
        tensor
    } else {
        TchTensor::new(tensor.tensor.to_kind(kind))
    }
}

/// The linear layer's node in Burn's graph, with its backward written out.
#[derive(Debug)]
struct DirectLinear;

/// What the linear layer's backward needs: its operands in the kind it multiplied in (under bf16
/// autocast the bf16 copies the forward made, so the backward casts nothing again); the input
/// only where the weight needs a gradient, the weight only where the input does.
#[derive(Debug, Clone)]
struct LinearSaved {
    input: Option<TchTensor>,
    weight: Option<TchTensor>,
    input_shape: Vec<i64>,
    kind: tch::Kind,
    input_kind: tch::Kind,
    weight_kind: tch::Kind,
    bias_kind: tch::Kind,
}

impl Backward<LibTorch, 3> for DirectLinear {
    type State = LinearSaved;

    /// With `g` the output's gradient over the input's rows: `d input = g @ weight^T`,
    /// `d weight = input^T @ g`, `d bias = sum of g's rows`, each in its operand's kind. Only the
    /// gradients Burn asks for are computed.
    fn backward(self, ops: Ops<LinearSaved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_output = grads.consume::<LibTorch>(&ops.node);
        let saved = ops.state;
        let d_output = grad_output.tensor.size().last().copied().unwrap_or(1);
        let grad = grad_output
            .tensor
            .to_kind(saved.kind)
            .reshape([-1, d_output]);
        let [input, weight, bias] = ops.parents;
        // A parent is present exactly where the forward saw it tracked, which is where it kept
        // the other operand.
        if let (Some(input), Some(weight)) = (input, &saved.weight) {
            let gradient = grad
                .mm(&weight.tensor.tr())
                .reshape(saved.input_shape.as_slice())
                .to_kind(saved.input_kind);
            grads.register::<LibTorch>(input.id, TchTensor::new(gradient));
        }
        if let (Some(weight), Some(input)) = (weight, &saved.input) {
            let d_input = saved.input_shape.last().copied().unwrap_or(1);
            let rows = input.tensor.reshape([-1, d_input]);
            let gradient = rows.tr().mm(&grad).to_kind(saved.weight_kind);
            grads.register::<LibTorch>(weight.id, TchTensor::new(gradient));
        }
        if let Some(bias) = bias {
            // Summed in f32 either way (libtorch accumulates a bf16 sum in f32). Only on CUDA
            // does its reduction read bf16 and write f32 in one pass; on the CPU `sum` with a
            // dtype first copies the whole gradient to it, so there the sum comes out in the
            // gradient's kind and is cast after, as PyTorch's autograd does it everywhere.
            let rows = [0i64];
            let gradient = if grad.device().is_cuda() {
                grad.sum_dim_intlist(rows.as_slice(), false, saved.bias_kind)
            } else {
                grad.sum_dim_intlist(rows.as_slice(), false, grad.kind())
                    .to_kind(saved.bias_kind)
            };
            grads.register::<LibTorch>(bias.id, TchTensor::new(gradient));
        }
    }
}

unsafe extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn parti_layer_norm_backward(
        grad_output: *mut c_void,
        input: *mut c_void,
        mean: *mut c_void,
        rstd: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        wanted: *const c_int,
        results: *mut *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
}

/// Whether `kind` is a 16-bit float, which autocast's f32 list casts up.
fn is_half(kind: tch::Kind) -> bool {
    matches!(kind, tch::Kind::Half | tch::Kind::BFloat16)
}

/// The kind a layer norm's operand enters in: f32 for a 16-bit one where bf16 autocast is on
/// on CUDA (layer_norm is on autocast's f32 list there; on the CPU it is not, and libtorch's CPU
/// kernel takes a bf16 input with f32 weights as it is), else its own kind.
fn layer_norm_kind(operand: &tch::Tensor) -> tch::Kind {
    let cuda = operand.device().is_cuda();
    if cuda && is_half(operand.kind()) && autocast_is_bf16(cuda) {
        tch::Kind::Float
    } else {
        operand.kind()
    }
}

/// A layer norm's forward, with what its backward needs.
struct LayerNormed {
    /// Input, gamma and beta in the kinds the layer norm read them in.
    operands: [TchTensor; 3],
    output: tch::Tensor,
    /// The rows' mean and reciprocal standard deviation.
    mean: tch::Tensor,
    rstd: tch::Tensor,
}

/// Layer norm over the last dimension as PyTorch runs `layer_norm`: each operand in
/// [`layer_norm_kind`], then `native_layer_norm`.
fn layer_norm_forward(operands: [TchTensor; 3]) -> LayerNormed {
    let [input, gamma, beta] = operands.map(|operand| {
        let kind = layer_norm_kind(&operand.tensor);
        in_kind(operand, kind)
    });
    let features = input.tensor.size().last().copied().unwrap_or(1);
    let (output, mean, rstd) = input.tensor.native_layer_norm(
        [features],
        Some(&gamma.tensor),
        Some(&beta.tensor),
        LAYER_NORM_EPSILON,
    );
    LayerNormed {
        operands: [input, gamma, beta],
        output,
        mean,
        rstd,
    }
}

/// The layer norm's node in Burn's graph: libtorch's `native_layer_norm` forward and
/// `native_layer_norm_backward`, called directly (the kernels PyTorch's autograd calls, without a
/// pass through libtorch's autograd engine per layer norm).
#[derive(Debug)]
struct DirectLayerNorm;

/// What the layer norm's backward needs: the operands in the kinds it computed in, the rows'
/// mean and reciprocal standard deviation, and the operands' own kinds for their gradients.
#[derive(Debug, Clone)]
struct LayerNormSaved {
    input: TchTensor,
    gamma: TchTensor,
    beta: TchTensor,
    mean: TchTensor,
    rstd: TchTensor,
    kinds: [tch::Kind; 3],
}

impl Backward<LibTorch, 3> for DirectLayerNorm {
    type State = LayerNormSaved;

    fn backward(self, ops: Ops<LayerNormSaved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_output = grads.consume::<LibTorch>(&ops.node);
        let saved = ops.state;
        let wanted = ops
            .parents
            .each_ref()
            .map(|parent| c_int::from(parent.is_some()));
        if wanted.iter().all(|&w| w == 0) {
            return;
        }
        let grad_output = grad_output.tensor.to_kind(saved.input.tensor.kind());
        let pointer = |tensor: &tch::Tensor| tensor.as_ptr().cast_mut().cast::<c_void>();
        let mut results = [std::ptr::null_mut::<c_void>(); 3];
        let outcome = checked(|error, capacity| unsafe {
            parti_layer_norm_backward(
                pointer(&grad_output),
                pointer(&saved.input.tensor),
                pointer(&saved.mean.tensor),
                pointer(&saved.rstd.tensor),
                pointer(&saved.gamma.tensor),
                pointer(&saved.beta.tensor),
                wanted.as_ptr(),
                results.as_mut_ptr(),
                error,
                capacity,
            )
        });
        if let Err(message) = outcome {
            // The shapes and kinds are the forward's own; a refusal is a bug, and Burn's
            // backward cannot return an error.
            panic!("libtorch's layer norm backward failed: {message}");
        }
        for ((parent, result), kind) in ops.parents.into_iter().zip(results).zip(saved.kinds) {
            // Each non-null result is a new at::Tensor* that the tch::Tensor now owns.
            let gradient =
                (!result.is_null()).then(|| unsafe { tch::Tensor::from_ptr(result.cast()) });
            if let (Some(parent), Some(gradient)) = (parent, gradient) {
                grads.register::<LibTorch>(parent.id, TchTensor::new(gradient.to_kind(kind)));
            }
        }
    }
}

/// Targets with this value add no loss (libtorch's default; parti's targets never take it).
const IGNORED: i64 = -100;

/// The kinds softmax cross-entropy computes in, `(log-softmax, loss)`, as PyTorch's `cross_entropy`
/// runs under autocast. On the CPU `cross_entropy_loss` is on autocast's f32 list: 16-bit logits
/// are cast up first. On CUDA it is not: its log-softmax keeps the logits' kind, and `nll_loss`,
/// which is on the f32 list there, casts the log-probabilities up.
fn cross_entropy_kinds(logits: tch::Kind, cuda: bool, autocast: bool) -> (tch::Kind, tch::Kind) {
    match (autocast && is_half(logits), cuda) {
        (false, _) => (logits, logits),
        (true, true) => (logits, tch::Kind::Float),
        (true, false) => (tch::Kind::Float, tch::Kind::Float),
    }
}

/// Softmax cross-entropy over rows, with what its backward needs.
struct CrossEntropyRows {
    /// `[rows]`, in the loss's kind.
    losses: tch::Tensor,
    /// `[rows, classes]`, in the log-softmax's kind.
    log_probs: tch::Tensor,
}

/// `logits: [rows, classes]`, `targets: [rows]` (i64): softmax cross-entropy with the numbers
/// `cross_entropy` gives in the kinds `(log-softmax, loss)` ([`cross_entropy_kinds`]).
///
/// Where the two kinds differ (CUDA's bf16 autocast: log-softmax in bf16, `nll_loss` in f32),
/// PyTorch casts every log-probability to f32 for `nll_loss`, which then reads one per row: a
/// `[rows, classes]` f32 copy written and read both ways (2 GB for the 350M slice's output head
/// at batch 64). `nll_loss` without class weights is `-log_prob[target]`, so taking it in the
/// log-softmax's kind ([`row_losses`]) and casting the row losses gives the same numbers bit for
/// bit (negation and widening are exact), and so does the backward in that kind (rounding is
/// symmetric in sign).
fn cross_entropy_rows(
    logits: &tch::Tensor,
    targets: &tch::Tensor,
    (softmax_kind, loss_kind): (tch::Kind, tch::Kind),
) -> CrossEntropyRows {
    let log_probs = logits.to_kind(softmax_kind).internal_log_softmax(1, false);
    let losses = row_losses(&log_probs, targets).to_kind(loss_kind);
    CrossEntropyRows { losses, log_probs }
}

/// Each row's `-log_prob[target]` (zero where the target is ignored) in the log-probabilities'
/// kind: `nll_loss` with autocast paused, since it is on autocast's f32 list, on the CPU as on
/// CUDA, and would cast every log-probability up first.
fn row_losses(log_probs: &tch::Tensor, targets: &tch::Tensor) -> tch::Tensor {
    let _in_their_kind = super::Autocast::pause();
    log_probs.nll_loss_nd(targets, None::<tch::Tensor>, tch::Reduction::None, IGNORED)
}

/// `logits: [.., classes]` and `targets: [..]` as PyTorch runs `cross_entropy` on the logits'
/// device ([`cross_entropy_kinds`]): the losses in the targets' shape, the rows' results, and the
/// targets flat in i64.
fn cross_entropy_forward(
    logits: &tch::Tensor,
    targets: &tch::Tensor,
) -> (tch::Tensor, CrossEntropyRows, tch::Tensor) {
    let classes = logits.size().last().copied().unwrap_or(1);
    let cuda = logits.device().is_cuda();
    let kinds = cross_entropy_kinds(logits.kind(), cuda, autocast_is_bf16(cuda));
    let flat_targets = targets.reshape([-1]).to_kind(tch::Kind::Int64);
    let rows = cross_entropy_rows(&logits.reshape([-1, classes]), &flat_targets, kinds);
    let losses = rows.losses.reshape(targets.size().as_slice());
    (losses, rows, flat_targets)
}

/// The gradient of [`cross_entropy_rows`]' logits in `logits_kind`, given the losses' `grad`:
/// `nll_loss_backward`, then `_log_softmax_backward_data`, both in the log-softmax's kind, the
/// kernels PyTorch's autograd runs (its `nll_loss_backward` runs in the loss's kind and is cast
/// after: the same numbers, see [`cross_entropy_rows`]).
fn cross_entropy_rows_backward(
    grad: &tch::Tensor,
    log_probs: &tch::Tensor,
    targets: &tch::Tensor,
    logits_kind: tch::Kind,
) -> tch::Tensor {
    // Without reduction the backward never reads the total weight; libtorch checks only that it
    // is one value on the input's device (its forward writes zero there).
    let total_weight = tch::Tensor::zeros([], (log_probs.kind(), log_probs.device()));
    let grad_log_probs = log_probs.nll_loss_backward(
        &grad.to_kind(log_probs.kind()),
        targets,
        None::<tch::Tensor>,
        tch::Reduction::None,
        IGNORED,
        &total_weight,
    );
    tch::Tensor::internal_log_softmax_backward_data(&grad_log_probs, log_probs, 1, log_probs.kind())
        .to_kind(logits_kind)
}

/// Softmax cross-entropy's node in Burn's graph: libtorch's log-softmax and `nll_loss` forward,
/// and their backward kernels (`nll_loss_backward`, `_log_softmax_backward_data`) called directly,
/// the kernels PyTorch's autograd runs for `cross_entropy`.
#[derive(Debug)]
struct DirectCrossEntropy;

/// What [`cross_entropy_rows`] kept, the targets, flat over rows, and the logits' shape and kind
/// for their gradient.
#[derive(Debug, Clone)]
struct CrossEntropySaved {
    log_probs: TchTensor,
    targets: TchTensor,
    logits_shape: Vec<i64>,
    logits_kind: tch::Kind,
}

impl Backward<LibTorch, 1> for DirectCrossEntropy {
    type State = CrossEntropySaved;

    fn backward(self, ops: Ops<CrossEntropySaved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_output = grads.consume::<LibTorch>(&ops.node);
        let [Some(logits)] = ops.parents else { return };
        let saved = ops.state;
        let gradient = cross_entropy_rows_backward(
            &grad_output.tensor.reshape([-1]),
            &saved.log_probs.tensor,
            &saved.targets.tensor,
            saved.logits_kind,
        )
        .reshape(saved.logits_shape.as_slice());
        grads.register::<LibTorch>(logits.id, TchTensor::new(gradient));
    }
}

/// The operation's node in Burn's graph; its backward is libtorch's.
#[derive(Debug)]
struct LibtorchKernel;

/// What the backward needs, held from the forward.
#[derive(Debug, Clone)]
struct Recorded {
    /// The inputs as libtorch leaves (requiring a gradient), which the recorded graph ends at.
    leaves: Vec<TchTensor>,
    /// The output with its recorded graph.
    output: TchTensor,
    /// Burn's own handles on the inputs and on the output it was given: held here, they make
    /// burn-tch see the storage as shared, so it never writes into it in place (that would
    /// invalidate what libtorch saved for the backward).
    #[expect(dead_code, reason = "held for its effect on burn-tch, never read")]
    pinned: Vec<TchTensor>,
}

/// Runs `kernel` on the inputs' libtorch tensors as one Burn autodiff operation whose backward
/// is the backward libtorch recorded for it.
fn recorded<C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
    kernel: impl FnOnce(&[tch::Tensor; N]) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let nodes = inputs.each_ref().map(|input| input.node());
    match LibtorchKernel
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let primitives = inputs.map(|input| input.into_primitive());
            let leaves = primitives
                .each_ref()
                .map(|input| input.tensor.detach().set_requires_grad(true));
            let output = tch::with_grad(|| kernel(&leaves));
            let given = TchTensor::new(output.detach());
            let mut pinned = primitives.to_vec();
            pinned.push(given.clone());
            let state = Recorded {
                leaves: leaves.into_iter().map(TchTensor::new).collect(),
                output: TchTensor::new(output),
                pinned,
            };
            prep.finish(state, given)
        }
        OpsKind::UnTracked(prep) => {
            let primitives = inputs.map(|input| input.into_primitive());
            let tensors = primitives
                .each_ref()
                .map(|input| input.tensor.shallow_clone());
            prep.finish(TchTensor::new(tch::no_grad(|| kernel(&tensors))))
        }
    }
}

impl<const N: usize> Backward<LibTorch, N> for LibtorchKernel {
    type State = Recorded;

    fn backward(self, ops: Ops<Recorded, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_output = grads.consume::<LibTorch>(&ops.node);
        let Recorded { leaves, output, .. } = ops.state;
        // Only the inputs Burn wants a gradient for: libtorch skips the rest of the work.
        let wanted: Vec<_> = ops
            .parents
            .iter()
            .zip(&leaves)
            .filter_map(|(parent, leaf)| parent.as_ref().map(|parent| (parent.id, leaf)))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let gradients = match grad(&output, &grad_output, wanted.iter().map(|(_, leaf)| *leaf)) {
            Ok(gradients) => gradients,
            // Burn's backward cannot return an error; libtorch refusing its own recorded graph
            // is a bug, reported as such.
            Err(message) => panic!("libtorch's backward of a fused operation failed: {message}"),
        };
        for ((id, leaf), gradient) in wanted.into_iter().zip(gradients) {
            let gradient = gradient.unwrap_or_else(|| leaf.tensor.zeros_like());
            grads.register::<LibTorch>(id, TchTensor::new(gradient));
        }
    }
}

/// The gradients of `output` for `leaves` given `grad_output`, as `torch::autograd::grad` would
/// give them, from the recorded graph's own nodes run on this thread (`csrc/autograd.cpp`);
/// `None` for a leaf the output does not depend on.
fn grad<'a>(
    output: &TchTensor,
    grad_output: &TchTensor,
    leaves: impl Iterator<Item = &'a TchTensor>,
) -> Result<Vec<Option<tch::Tensor>>, String> {
    let mut inputs: Vec<*mut c_void> = leaves
        .map(|leaf| leaf.tensor.as_ptr().cast_mut().cast())
        .collect();
    let mut results: Vec<*mut c_void> = vec![std::ptr::null_mut(); inputs.len()];
    checked(|error, capacity| unsafe {
        parti_graph_backward(
            output.tensor.as_ptr().cast_mut().cast(),
            grad_output.tensor.as_ptr().cast_mut().cast(),
            inputs.as_mut_ptr(),
            inputs.len(),
            results.as_mut_ptr(),
            error,
            capacity,
        )
    })?;
    // Each non-null result is a new at::Tensor* that the tch::Tensor now owns (and frees).
    Ok(results
        .into_iter()
        .map(|result| (!result.is_null()).then(|| unsafe { tch::Tensor::from_ptr(result.cast()) }))
        .collect())
}

unsafe extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn parti_fused_adamw(
        param: *mut c_void,
        grad: *mut c_void,
        moment_1: *mut c_void,
        moment_2: *mut c_void,
        step: i64,
        lr: f64,
        beta_1: f64,
        beta_2: f64,
        weight_decay: f64,
        epsilon: f64,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
}

/// A parameter and its two AdamW moments, updated together.
#[derive(ExtensionType)]
pub struct AdamWTensors<B: Backend> {
    pub param: FloatTensor<B>,
    pub moment_1: FloatTensor<B>,
    pub moment_2: FloatTensor<B>,
}

/// Optimizers see parameters without their autodiff wrapper, so only `LibTorch` is listed.
#[backend_extension(LibTorch)]
pub trait FusedAdamWOps: Backend {
    #[allow(clippy::too_many_arguments)]
    fn fused_adamw_step(
        #[extension_type] tensors: AdamWTensors<Self>,
        grad: FloatTensor<Self>,
        step: u64,
        lr: f64,
        beta_1: f64,
        beta_2: f64,
        weight_decay: f64,
        epsilon: f64,
    ) -> AdamWTensors<Self>;
}

impl FusedAdamWOps for LibTorch {
    fn fused_adamw_step(
        tensors: AdamWTensors<Self>,
        grad: TchTensor,
        step: u64,
        lr: f64,
        beta_1: f64,
        beta_2: f64,
        weight_decay: f64,
        epsilon: f64,
    ) -> AdamWTensors<Self> {
        // The kernel writes in place: into storage only this step holds (burn-tch's own rule for
        // in-place ops), else into a copy, so a model clone kept elsewhere never changes.
        let owned = |tensor: TchTensor| {
            if tensor.can_mut() && tensor.tensor.is_contiguous() {
                tensor
            } else {
                TchTensor::new(tensor.tensor.contiguous().copy())
            }
        };
        let (param, moment_1, moment_2) = (
            owned(tensors.param),
            owned(tensors.moment_1),
            owned(tensors.moment_2),
        );
        let grad = grad.tensor.contiguous();
        let pointer = |tensor: &tch::Tensor| tensor.as_ptr().cast_mut().cast::<c_void>();
        let result = checked(|error, capacity| unsafe {
            parti_fused_adamw(
                pointer(&param.tensor),
                pointer(&grad),
                pointer(&moment_1.tensor),
                pointer(&moment_2.tensor),
                i64::try_from(step).unwrap_or(i64::MAX),
                lr,
                beta_1,
                beta_2,
                weight_decay,
                epsilon,
                error,
                capacity,
            )
        });
        if let Err(message) = result {
            // Shapes and kinds always match here (the optimizer made the moments from the
            // gradient); a refusal is a bug, and Burn's optimizer step cannot return an error.
            panic!("libtorch's fused AdamW step failed: {message}");
        }
        AdamWTensors {
            param,
            moment_1,
            moment_2,
        }
    }
}

/// [`super::AdamW`] on `tch`: Burn's AdamW arithmetic (the same state, so the same checkpoints)
/// as libtorch's fused kernel, one pass per parameter instead of a dozen tensor ops.
#[derive(Clone, Debug)]
pub(super) struct FusedAdamW {
    pub(super) beta_1: f32,
    pub(super) beta_2: f32,
    pub(super) epsilon: f32,
    pub(super) weight_decay: f32,
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamWState<D>>,
    ) -> (Tensor<D>, Option<AdamWState<D>>) {
        // Burn's first step sets the moments from the gradient alone: the same as a step from
        // zero moments.
        let (time, moment_1, moment_2) = match state {
            Some(AdamWState { momentum }) => (momentum.time, momentum.moment_1, momentum.moment_2),
            None => (0, grad.zeros_like(), grad.zeros_like()),
        };
        let time = time + 1;
        let updated = <Dispatch as FusedAdamWOps>::fused_adamw_step(
            AdamWTensors {
                param: tensor.into_dispatch(),
                moment_1: moment_1.into_dispatch(),
                moment_2: moment_2.into_dispatch(),
            },
            grad.into_dispatch(),
            time as u64,
            lr,
            f64::from(self.beta_1),
            f64::from(self.beta_2),
            f64::from(self.weight_decay),
            f64::from(self.epsilon),
        );
        let momentum = AdaptiveMomentumState::new(
            time,
            Tensor::from_dispatch(updated.moment_1),
            Tensor::from_dispatch(updated.moment_2),
        );
        (
            Tensor::from_dispatch(updated.param),
            Some(AdamWState { momentum }),
        )
    }

    fn to_device<const D: usize>(mut state: AdamWState<D>, device: &Device) -> AdamWState<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

unsafe extern "C" {
    fn parti_autocast_bf16(
        cuda: c_int,
        on: c_int,
        was_on: *mut c_int,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
}

/// Turns libtorch's bf16 autocast on or off on this thread; returns whether it was on.
pub(super) fn set_autocast_bf16(cuda: bool, on: bool) -> Result<bool, String> {
    let mut was_on: c_int = 0;
    checked(|error, capacity| unsafe {
        parti_autocast_bf16(
            c_int::from(cuda),
            c_int::from(on),
            &mut was_on,
            error,
            capacity,
        )
    })?;
    Ok(was_on != 0)
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Reduction, Tensor};

    use super::{
        IGNORED, cross_entropy_kinds, cross_entropy_rows, cross_entropy_rows_backward, row_losses,
        set_autocast_bf16,
    };

    /// Where autocast casts `cross_entropy`'s operands: up front on the CPU, after the softmax on
    /// CUDA (PyTorch's autocast lists), nowhere without autocast or for f32 logits.
    #[test]
    fn cross_entropy_computes_in_the_kinds_autocast_gives_it_on_each_device() {
        use Kind::{BFloat16, Float};
        assert_eq!(cross_entropy_kinds(BFloat16, false, true), (Float, Float));
        assert_eq!(cross_entropy_kinds(BFloat16, true, true), (BFloat16, Float));
        assert_eq!(
            cross_entropy_kinds(BFloat16, true, false),
            (BFloat16, BFloat16)
        );
        assert_eq!(cross_entropy_kinds(Float, true, true), (Float, Float));
        assert_eq!(cross_entropy_kinds(Float, false, true), (Float, Float));
    }

    /// Under autocast (here the CPU's, whose f32 list has `nll_loss` too, as CUDA's does) the row
    /// losses are taken from the bf16 log-probabilities as they are, not from an f32 copy, and
    /// are the numbers `nll_loss` gives on that copy.
    #[test]
    fn row_losses_read_the_log_probabilities_in_their_kind_under_autocast() {
        use Kind::{BFloat16, Float};
        tch::manual_seed(11);
        let log_probs = (Tensor::randn([8, 30], (Float, tch::Device::Cpu)) * 4.0)
            .log_softmax(1, Float)
            .to_kind(BFloat16);
        let targets = Tensor::from_slice(&[1i64, 29, 0, IGNORED, 7, 7, 12, 3]);
        let was_on = set_autocast_bf16(false, true).unwrap();
        let ours = row_losses(&log_probs, &targets);
        let autocast = log_probs.nll_loss_nd(&targets, None::<Tensor>, Reduction::None, IGNORED);
        set_autocast_bf16(false, was_on).unwrap();
        assert_eq!(
            autocast.kind(),
            Float,
            "autocast casts nll_loss's input to f32"
        );
        assert_eq!(ours.kind(), BFloat16, "the row losses' kind");
        assert!(ours.to_kind(Float).equal(&autocast), "the same numbers");
    }

    /// Every kind pair, the CUDA one included (run here on the CPU with its kinds given): losses
    /// and the logits' gradient equal bit for bit to libtorch's autograd through the same ops.
    #[test]
    fn cross_entropy_rows_and_their_backward_are_libtorchs_autograd_in_every_kind_pair() {
        use Kind::{BFloat16, Float};
        tch::manual_seed(7);
        let (rows, classes) = (64, 50);
        // Row 3 ignored: its loss and gradient are zero.
        let targets: Vec<i64> = (0..rows)
            .map(|row| if row == 3 { IGNORED } else { row * 7 % classes })
            .collect();
        let targets = Tensor::from_slice(&targets);
        let weights = Tensor::randn([rows], (Float, tch::Device::Cpu));
        for (logits_kind, kinds) in [
            (Float, (Float, Float)),
            (BFloat16, (Float, Float)),
            (BFloat16, (BFloat16, Float)),
            (BFloat16, (BFloat16, BFloat16)),
        ] {
            let logits = (Tensor::randn([rows, classes], (Float, tch::Device::Cpu)) * 4.0)
                .to_kind(logits_kind);
            let ours = cross_entropy_rows(&logits, &targets, kinds);
            let ours_grad =
                cross_entropy_rows_backward(&weights, &ours.log_probs, &targets, logits_kind);
            let z = logits.detach().set_requires_grad(true);
            let theirs = z
                .to_kind(kinds.0)
                .log_softmax(1, kinds.0)
                .to_kind(kinds.1)
                .nll_loss_nd(&targets, None::<Tensor>, Reduction::None, IGNORED);
            (theirs.to_kind(Float) * &weights).sum(Float).backward();
            let what = format!("{logits_kind:?} logits, {kinds:?}");
            assert_eq!(ours.losses.kind(), kinds.1, "{what}: the losses' kind");
            assert_eq!(ours_grad.kind(), logits_kind, "{what}: the gradient's kind");
            assert!(ours.losses.equal(&theirs), "{what}: losses");
            assert!(ours_grad.equal(&z.grad()), "{what}: d logits");
        }
    }
}
