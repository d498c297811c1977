// One AdamW step of one parameter as libtorch's fused kernel (`_fused_adamw_`, what
// `torch.optim.AdamW(fused=True)` calls): one pass over the parameter, its gradient and both
// moments, updating all three in place. tch-rs does not bind it. The caller (src/fused/optim.rs)
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
    auto steps = at::full({}, static_cast<double>(step), p.options());
    at::_fused_adamw_(
        {p},
        {*static_cast<at::Tensor*>(grad)},
        {*static_cast<at::Tensor*>(moment_1)},
        {*static_cast<at::Tensor*>(moment_2)},
        {},
        {steps},
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
