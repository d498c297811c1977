// The backward half of parti's fused attention on the `tch` backend (src/fused/libtorch.rs).
//
// Its forward runs libtorch's own kernel (scaled_dot_product_attention) on inputs marked as
// requiring a gradient, so libtorch records the one-node graph PyTorch itself would record,
// saving what that kernel's backward needs (the output and the log-sum-exp, never the
// [heads, n, n] scores). Burn's autodiff keeps the recorded output and calls this when its
// backward pass reaches the operation: the gradients come from the same backward kernel PyTorch
// runs, whichever SDPA variant (flash, memory-efficient, math) libtorch chose for the device.
// tch-rs binds `torch::autograd::grad` only without output gradients, which is why this file
// exists.

#include <torch/csrc/autograd/autograd.h>

#include "guarded.h"

#include <cstddef>
#include <vector>

extern "C" {

// Gradients of `output` (an at::Tensor*) with respect to `inputs[0..count]` given `grad_output`,
// as new at::Tensor* in `results` (null where an input does not reach the output). Frees the
// recorded graph.
int parti_autograd_grad(
    void* output,
    void* grad_output,
    void** inputs,
    size_t count,
    void** results,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    std::vector<at::Tensor> leaves;
    leaves.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      leaves.push_back(*static_cast<at::Tensor*>(inputs[i]));
    }
    auto gradients = torch::autograd::grad(
        {*static_cast<at::Tensor*>(output)},
        leaves,
        {*static_cast<at::Tensor*>(grad_output)},
        /*retain_graph=*/false,
        /*create_graph=*/false,
        /*allow_unused=*/true);
    for (size_t i = 0; i < count; ++i) {
      results[i] = gradients[i].defined() ? new at::Tensor(std::move(gradients[i])) : nullptr;
    }
  });
}

} // extern "C"
