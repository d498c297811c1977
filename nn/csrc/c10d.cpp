// The few c10d calls parti's data-parallel training needs, with a C interface for Rust.
//
// c10d is PyTorch's distributed runtime and ships inside libtorch (Gloo in libtorch_cpu), which
// the `tch` backend already loads; tch-rs binds none of it. Tensors arrive as the `at::Tensor*`
// a `tch::Tensor` wraps. No C++ exception crosses into Rust: every entry point returns 0, or
// non-zero with the reason written into `error`.

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "guarded.h"

#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

void wait(const Group& group, const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait(group.timeout);
}

// nccl.cpp's entry point, from the library `make nccl` builds on a CUDA machine.
using NcclBackend = int (*)(void*, int, int, int, int64_t, void**, char*, size_t);

c10::intrusive_ptr<c10d::Backend> nccl_backend(
    const char* library,
    c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world_size,
    int device,
    std::chrono::milliseconds timeout) {
  void* handle = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(
      handle != nullptr,
      "NCCL on CUDA needs ", library, " (`make nccl` builds it on a machine with CUDA): ",
      dlerror());
  auto make = reinterpret_cast<NcclBackend>(dlsym(handle, "parti_nccl_backend"));
  TORCH_CHECK(make != nullptr, library, " has no parti_nccl_backend: ", dlerror());
  char message[1024] = {0};
  void* made = nullptr;
  int code = make(&store, rank, world_size, device, timeout.count(), &made, message,
                  sizeof message);
  TORCH_CHECK(code == 0 && made != nullptr, "ProcessGroupNCCL: ", message);
  auto owned = static_cast<c10::intrusive_ptr<c10d::Backend>*>(made);
  auto backend = *owned;
  delete owned;
  return backend;
}

} // namespace

extern "C" {

// Rendezvous at `host:port` (rank 0 hosts the TCPStore there), then the process group: NCCL on
// GPU `cuda_device` through `nccl_library` when `cuda_device` >= 0, else Gloo over `interface`
// (empty: the host name's address, as torchrun's default).
int parti_c10d_join(
    const char* host,
    uint16_t port,
    int rank,
    int world_size,
    int64_t timeout_ms,
    const char* interface,
    int cuda_device,
    const char* nccl_library,
    void** out,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto group = std::make_unique<Group>();
    group->timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = rank == 0;
    options.numWorkers = static_cast<size_t>(world_size);
    options.waitWorkers = true;
    options.timeout = group->timeout;
    group->store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    if (cuda_device >= 0) {
      group->backend = nccl_backend(
          nccl_library, group->store, rank, world_size, cuda_device, group->timeout);
      *out = group.release();
      return;
    }
    auto gloo = c10d::ProcessGroupGloo::Options::create(group->timeout);
    std::string name(interface == nullptr ? "" : interface);
    gloo->devices.push_back(
        name.empty() ? c10d::ProcessGroupGloo::createDefaultDevice()
                     : c10d::ProcessGroupGloo::createDeviceForInterface(name));
    group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
        group->store, rank, world_size, gloo);
    *out = group.release();
  });
}

// Shuts the backend down first, as `destroy_process_group()` does (NCCL tears its
// communicators down and warns when it is skipped).
void parti_c10d_free(void* group) {
  auto* g = static_cast<Group*>(group);
  char ignored[256];
  parti::guarded(ignored, sizeof ignored, [&] { g->backend->shutdown(); });
  delete g;
}

// Sums `tensor` (an at::Tensor*) over all ranks, in place.
int parti_c10d_all_reduce_sum(
    void* group,
    void* tensor,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    wait(g, g.backend->allreduce(tensors, options));
  });
}

// Every rank's `input` into row `rank` of `output` (shape [world_size, ...input's shape]).
int parti_c10d_all_gather(
    void* group,
    void* output,
    void* input,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& g = *static_cast<Group*>(group);
    auto& gathered = *static_cast<at::Tensor*>(output);
    std::vector<at::Tensor> inputs{*static_cast<at::Tensor*>(input)};
    std::vector<std::vector<at::Tensor>> outputs{gathered.unbind(0)};
    wait(g, g.backend->allgather(outputs, inputs));
  });
}

// Rank `root`'s `tensor` onto every rank, in place.
int parti_c10d_broadcast(
    void* group,
    void* tensor,
    int root,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    wait(g, g.backend->broadcast(tensors, options));
  });
}

int parti_c10d_barrier(void* group, char* error, size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& g = *static_cast<Group*>(group);
    wait(g, g.backend->barrier());
  });
}

// The rendezvous store, for what is not a tensor: which ranks are still there after a failure.
int parti_c10d_store_set(
    void* group,
    const char* key,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& g = *static_cast<Group*>(group);
    g.store->set(std::string(key), std::vector<uint8_t>{1});
  });
}

int parti_c10d_store_check(
    void* group,
    const char* key,
    int* present,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    auto& g = *static_cast<Group*>(group);
    *present = g.store->check({std::string(key)}) ? 1 : 0;
  });
}

} // extern "C"
