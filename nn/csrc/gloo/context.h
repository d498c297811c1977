// See README.md: declarations only, for c10d's ProcessGroupGloo.hpp.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  // Named by an inline method of ProcessGroupGloo; never called from parti.
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
