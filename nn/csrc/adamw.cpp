// One AdamW step of one parameter as libtorch's fused kernel (`_fused_adamw_`, what
// `torch.optim.AdamW(fused=True)` calls): one pass over the parameter, its gradient and both
// moments, updating all three in place. tch-rs does not bind it. The caller (src/fused/libtorch.rs)
// hands in tensors nothing else holds.

#include <ATen/ATen.h>
#include <ATen/ops/_fused_adamw.h>

#include "guarded.h"

#include <cstddef>
#include <cstdint>

extern "C" {

// `step` is the step being taken (1 for the first).
int parti_fused_adamw(
    void* param,
    void* grad,
    void* moment_1,
    void* moment_2,
    int64_t step,
    double lr,
    double beta_1,
    double beta_2,
    double weight_decay,
    double epsilon,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& p = *static_cast<at::Tensor*>(param);
    // The kernel only reads the step count (an f32 value, as torch.optim keeps it for the
    // fused kernel), and every parameter of an optimizer step takes the same one: one tensor
    // per step and device, not one per parameter (each a kernel launch on a GPU). Kept per
    // thread, so optimizers stepping on two threads at once never share it; held by a pointer
    // that is never destroyed at thread exit, since a CUDA tensor freed after CUDA shuts down at
    // process exit is an error.
    thread_local at::Tensor* steps = nullptr;
    thread_local int64_t steps_value = 0;
    if (steps == nullptr || steps_value != step || steps->device() != p.device()) {
      auto fresh = new at::Tensor(
          at::full({}, static_cast<double>(step), p.options().dtype(at::kFloat)));
      delete steps;
      steps = fresh;
      steps_value = step;
    }
    at::_fused_adamw_(
        {p},
        {*static_cast<at::Tensor*>(grad)},
        {*static_cast<at::Tensor*>(moment_1)},
        {*static_cast<at::Tensor*>(moment_2)},
        {},
        {*steps},
        lr,
        beta_1,
        beta_2,
        weight_decay,
        epsilon,
        /*amsgrad=*/false,
        /*maximize=*/false);
  });
}

} // extern "C"
