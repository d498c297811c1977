// The backward half of parti's fused attention on the `tch` backend (src/fused/libtorch.rs).
//
// Its forward runs libtorch's own kernel (scaled_dot_product_attention) on inputs marked as
// requiring a gradient, so libtorch records the small graph PyTorch itself would record (the
// autocast casts, then the node of whichever SDPA variant it chose for the device: flash,
// memory-efficient, cuDNN or math), saving what that variant's backward needs (the output and
// the log-sum-exp, never the [heads, n, n] scores). Burn's autodiff keeps the recorded output
// and calls this when its backward pass reaches the operation.
//
// This runs that graph's nodes itself, on the calling thread, in dependency order, as libtorch's
// autograd engine would (the same nodes, hence the same kernels and the same gradients), but
// without the engine: a pass through it builds a graph task and, for a CUDA graph, hands the
// work to the engine's device thread and waits for it, host time that a step of small kernels
// cannot hide on a GPU (BENCHMARKS.md, "GPU: one H200").

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include "guarded.h"

#include <cstddef>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using torch::autograd::Edge;
using torch::autograd::Node;
using torch::autograd::variable_list;

// What the engine's validate_outputs does to a gradient on its way into a node's input: sum it
// down to the input's shape where it was broadcast (refusing one that does not broadcast to
// it), and give it the input's dtype.
at::Tensor fit_to_input(at::Tensor gradient, const Edge& edge) {
  const auto& metadata = edge.function->input_metadata(edge.input_nr);
  gradient = metadata.maybe_reduce(edge.input_nr, std::move(gradient), [&](const std::string& what) {
    return std::string("the gradient for ") + edge.function->name() + ": " + what;
  });
  const auto dtype = c10::typeMetaToScalarType(metadata.options().dtype());
  if (gradient.scalar_type() != dtype) {
    gradient = gradient.to(dtype);
  }
  return gradient;
}

void accumulate(at::Tensor& slot, at::Tensor gradient) {
  slot = slot.defined() ? slot + gradient : std::move(gradient);
}

} // namespace

extern "C" {

// Gradients of `output` (an at::Tensor*) with respect to the leaves `inputs[0..count]` given
// `grad_output`, as new at::Tensor* in `results` (null where an input does not reach the
// output). Frees what the recorded graph saved.
int parti_graph_backward(
    void* output,
    void* grad_output,
    void** inputs,
    size_t count,
    void** results,
    char* error,
    size_t capacity) {
  return parti::guarded(error, capacity, [&] {
    for (size_t i = 0; i < count; ++i) {
      results[i] = nullptr;
    }
    // The backward's own ops record nothing (the engine's create_graph = false).
    at::NoGradGuard no_grad;
    const auto root = torch::autograd::impl::gradient_edge(*static_cast<at::Tensor*>(output));
    TORCH_CHECK(root.is_valid(), "the output has no recorded graph to run backward through");

    // Each leaf's gradient arrives at its accumulator node, where the walk stops.
    std::unordered_map<const Node*, size_t> leaf_of;
    for (size_t i = 0; i < count; ++i) {
      auto accumulator =
          torch::autograd::impl::try_get_grad_accumulator(*static_cast<at::Tensor*>(inputs[i]));
      if (accumulator) {
        leaf_of.emplace(accumulator.get(), i);
      }
    }
    std::vector<at::Tensor> leaf_gradients(count);

    // How many edges lead into each node of the graph above the leaves, and the gradients
    // arriving at each node's inputs (undefined until one does, as in the engine's buffers).
    std::unordered_map<Node*, size_t> waiting_for;
    std::unordered_map<Node*, variable_list> incoming;
    std::vector<Node*> to_visit{root.function.get()};
    waiting_for.emplace(root.function.get(), 0);
    incoming[root.function.get()].resize(root.function->num_inputs());
    while (!to_visit.empty()) {
      Node* node = to_visit.back();
      to_visit.pop_back();
      for (const auto& edge : node->next_edges()) {
        Node* next = edge.function.get();
        if (next == nullptr || leaf_of.count(next) != 0) {
          continue;
        }
        // Another leaf's accumulator: running it would write that tensor's .grad.
        if (dynamic_cast<torch::autograd::AccumulateGrad*>(next) != nullptr) {
          continue;
        }
        auto [entry, first_time] = waiting_for.emplace(next, 0);
        entry->second += 1;
        if (first_time) {
          incoming[next].resize(next->num_inputs());
          to_visit.push_back(next);
        }
      }
    }

    incoming[root.function.get()][root.input_nr] =
        fit_to_input(*static_cast<at::Tensor*>(grad_output), root);
    std::vector<Node*> ready{root.function.get()};
    while (!ready.empty()) {
      Node* node = ready.back();
      ready.pop_back();
      auto node_inputs = std::move(incoming[node]);
      incoming.erase(node);
      node->will_release_variables();
      auto node_outputs = (*node)(std::move(node_inputs));
      node->release_variables();
      TORCH_CHECK(
          node_outputs.size() == node->num_outputs(),
          node->name(),
          " returned ",
          node_outputs.size(),
          " gradients for ",
          node->num_outputs(),
          " inputs");
      for (size_t i = 0; i < node_outputs.size(); ++i) {
        const auto& edge = node->next_edge(i);
        if (!edge.is_valid()) {
          continue;
        }
        Node* next = edge.function.get();
        auto leaf = leaf_of.find(next);
        if (leaf != leaf_of.end()) {
          if (node_outputs[i].defined()) {
            accumulate(leaf_gradients[leaf->second], fit_to_input(std::move(node_outputs[i]), edge));
          }
          continue;
        }
        auto waiting = waiting_for.find(next);
        if (waiting == waiting_for.end()) {
          continue;
        }
        if (node_outputs[i].defined()) {
          accumulate(
              incoming[next][edge.input_nr], fit_to_input(std::move(node_outputs[i]), edge));
        }
        if (--waiting->second == 0) {
          // A node none of whose inputs got a gradient still runs, with undefined inputs, as
          // in the engine; its outputs are then undefined too.
          ready.push_back(next);
        }
      }
    }
    for (size_t i = 0; i < count; ++i) {
      if (leaf_gradients[i].defined()) {
        results[i] = new at::Tensor(std::move(leaf_gradients[i]));
      }
    }
  });
}

} // extern "C"
