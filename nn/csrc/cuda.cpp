// libtorch's CUDA half, loaded on demand. The binaries call nothing in libtorch_cuda directly
// (its kernels register themselves with the dispatcher when it loads), so the linker drops it
// as unneeded and a CUDA libtorch would see no GPU; `--device cuda` loads it first.

#include "guarded.h"

#include <dlfcn.h>

extern "C" {

// Loads libtorch_cuda.so from the library path (LD_LIBRARY_PATH: $LIBTORCH/lib).
int parti_load_libtorch_cuda(char* error, size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    void* handle = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(handle != nullptr, dlerror());
  });
}

} // extern "C"
