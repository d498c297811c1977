// Layer norm's backward kernel (`native_layer_norm_backward`, what PyTorch's autograd calls for
// `layer_norm`), called directly by the layer norm's node in Burn's graph
// (src/fused/libtorch.rs): tch-rs binds the forward, `native_layer_norm`, but not this.

#include <ATen/ATen.h>
#include <ATen/ops/native_layer_norm_backward.h>

#include "guarded.h"

#include <array>
#include <cstddef>
#include <optional>
#include <vector>

extern "C" {

// Gradients of a layer norm over the last dimension of `input` (all at::Tensor*, as the forward
// saw them; `mean` and `rstd` from `native_layer_norm`) for the input, weight and bias where
// `wanted[i]` is non-zero, as new at::Tensor* in `results` (null where not wanted).
int parti_layer_norm_backward(
    void* grad_output,
    void* input,
    void* mean,
    void* rstd,
    void* weight,
    void* bias,
    const int* wanted,
    void** results,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    const auto& x = *static_cast<at::Tensor*>(input);
    std::vector<int64_t> normalized_shape{x.size(-1)};
    auto gradients = at::native_layer_norm_backward(
        *static_cast<at::Tensor*>(grad_output),
        x,
        normalized_shape,
        *static_cast<at::Tensor*>(mean),
        *static_cast<at::Tensor*>(rstd),
        std::optional<at::Tensor>(*static_cast<at::Tensor*>(weight)),
        std::optional<at::Tensor>(*static_cast<at::Tensor*>(bias)),
        std::array<bool, 3>{wanted[0] != 0, wanted[1] != 0, wanted[2] != 0});
    std::array<at::Tensor, 3> all{
        std::get<0>(gradients), std::get<1>(gradients), std::get<2>(gradients)};
    for (size_t i = 0; i < all.size(); ++i) {
      results[i] = wanted[i] != 0 && all[i].defined() ? new at::Tensor(std::move(all[i])) : nullptr;
    }
  });
}

} // extern "C"
