// Quantization passes driven through LibTorch's JIT graph-mode passes.
#pragma once

#include <torch/script.h>

#include <string>
#include <vector>

#include "worker/engine/recipe.h"

namespace pare::engine {

struct DynamicQuantResult {
  torch::jit::Module module;
  std::vector<std::string> notes;     // what was kept in float, and why
  int linear = 0, lstm = 0, gru = 0;  // modules quantized
};

// Dynamic INT8: linear layers, LSTMs and GRUs get int8 weights (per-tensor symmetric) and
// quantize their activations on the fly. Returns a new module and leaves the input unchanged,
// or (in_place: no copy of the weights) rewrites the input's own types and objects.
DynamicQuantResult QuantizeDynamic(const torch::jit::Module& module, bool in_place = false);

// 16-bit float weights behind a float32 interface: returns a module whose forward casts
// its tensor input to the 16-bit type, runs the converted model, and casts the result back.
torch::jit::Module ConvertHalf(const torch::jit::Module& module, const HalfPrecisionSpec& spec);

// relu(max_pool(conv(x))) -> max_pool(relu(conv(x))) in `graph` (the same values: relu and max
// commute), so that static quantization fuses the relu into its convolution. Returns how many.
int HoistReluOverMaxPool(const std::shared_ptr<torch::jit::Graph>& graph);

// After InsertObservers on an inlined forward: moves the observer of an aten conv's output to
// the relu that follows it (as LibTorch does for Conv submodule calls), so that the pair is
// quantized into one quantized::conv*d_relu. Returns how many were moved.
int ObserveAfterConvRelu(const std::shared_ptr<torch::jit::Graph>& graph);

// Static INT8: folds conv-bn, observes activations on `calibration` batches (each already
// on the CPU), and converts to quantized ops. Returns the new module; `notes` (when given)
// gets what the report should say: the activation range chosen for the target CPU, weights
// quantized per tensor, layers that stayed float.
// `more[i]`: forward's further inputs that go with `calibration[i]`, for models that take several.
torch::jit::Module QuantizeStatic(const torch::jit::Module& module, const StaticQuantSpec& spec,
                                  const std::vector<at::Tensor>& calibration,
                                  std::vector<std::string>* notes = nullptr,
                                  const std::vector<std::vector<at::Tensor>>& more = {});

}  // namespace pare::engine
