// c10d's NCCL process group, built on a machine with CUDA into its own shared library
// (`make nccl`: libparti_nccl.so beside the binaries) and loaded by c10d.cpp when a rank trains
// on a GPU. It lives apart because ProcessGroupNCCL's headers need CUDA's and NCCL's, which the
// build that CI and CPU users run has no use for; its symbols are in libtorch_cuda, which a
// CUDA libtorch has loaded by the time a group is joined.
//
// The one entry point takes the rendezvous store c10d.cpp opened and returns the backend, both
// as the c10d smart pointers c10d.cpp holds (the same libtorch headers build both sides).

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "guarded.h"

#include <chrono>
#include <cstdint>

extern "C" {

// `store`: a c10::intrusive_ptr<c10d::Store>*. `*out` becomes a new
// c10::intrusive_ptr<c10d::Backend>* (the caller deletes it), bound to GPU `device`.
int parti_nccl_backend(
    void* store,
    int rank,
    int world_size,
    int device,
    int64_t timeout_ms,
    void** out,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& rendezvous = *static_cast<c10::intrusive_ptr<c10d::Store>*>(store);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        rendezvous, rank, world_size, options);
    // Bound to its GPU (as PyTorch's `init_process_group(device_id=...)`): the barrier knows
    // the device instead of guessing it from the rank, and the communicator is made here, so a
    // broken NCCL setup fails the join, not the first gradient all-reduce.
    at::Device gpu(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    nccl->setBoundDeviceId(gpu);
    nccl->eagerConnectSingleDevice(gpu);
    *out = new c10::intrusive_ptr<c10d::Backend>(std::move(nccl));
  });
}

} // extern "C"
