// libtorch's profiler (Kineto, as torch.profiler uses), for `bench --profile`: every op and, on
// a GPU, every kernel with its time, written as a Chrome trace that chrome://tracing, Perfetto
// or bench/trace_summary.py read.

#include <torch/csrc/autograd/profiler_kineto.h>

#include "guarded.h"

#include <set>
#include <string>

extern "C" {

// Starts recording on this thread: CPU ops, and CUDA kernels when `cuda` is non-zero.
int parti_profiler_start(int cuda, char* error, size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    using torch::profiler::impl::ActivityType;
    using torch::profiler::impl::ProfilerConfig;
    using torch::profiler::impl::ProfilerState;
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda != 0) {
      activities.insert(ActivityType::CUDA);
    }
    // Input shapes and dtypes too, so two traces can be compared op by op (which ran in f32).
    ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  });
}

// Stops recording and writes the trace to `path`.
int parti_profiler_stop(const char* path, char* error, size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    TORCH_CHECK(result != nullptr, "the profiler was not recording");
    result->save(std::string(path));
  });
}

} // extern "C"
