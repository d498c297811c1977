// libtorch's autocast, as `torch.autocast(device, dtype=torch.bfloat16)` sets it: a per-thread
// switch the dispatcher reads, so the matrix products and attention that burn-tch calls run in
// bf16 while layer norm, softmax, the losses and the parameters stay in f32. Burn's autodiff
// calls the same ops for the backward pass on the same thread, so it is covered too.

#include <ATen/autocast_mode.h>

#include "guarded.h"

extern "C" {

// Turns bf16 autocast on or off on this thread for the CPU (`cuda` 0) or CUDA devices;
// `*was_on` receives the previous setting, to restore.
int parti_autocast_bf16(int cuda, int on, int* was_on, char* error, size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto type = cuda != 0 ? at::kCUDA : at::kCPU;
    *was_on = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    if (on != 0) {
      at::autocast::set_autocast_dtype(type, at::kBFloat16);
      at::autocast::increment_nesting();
    } else if (at::autocast::decrement_nesting() == 0) {
      // As torch.autocast's exit: casts cached for this region go with it.
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, on != 0);
  });
}

// Whether bf16 autocast is on on this thread for the CPU (`cuda` 0) or CUDA devices. The fused
// linear operation casts its operands itself, as autocast would, so that it can keep the casts
// for its backward pass instead of casting again there. Reads two thread-local flags; nothing in
// it throws.
int parti_autocast_is_bf16(int cuda) noexcept {
  auto type = cuda != 0 ? at::kCUDA : at::kCPU;
  return at::autocast::is_autocast_enabled(type) &&
          at::autocast::get_autocast_dtype(type) == at::kBFloat16
      ? 1
      : 0;
}

} // extern "C"
