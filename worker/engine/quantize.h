// Quantization passes driven through LibTorch's JIT graph-mode passes.
#pragma once

#include <torch/script.h>

#include <vector>

#include "worker/engine/recipe.h"

namespace pare::engine {

// Dynamic INT8: linear layers get int8 weights (per-tensor symmetric) and quantize
// their activations on the fly. Returns the new module; the input is left unchanged.
torch::jit::Module QuantizeDynamic(const torch::jit::Module& module);

// 16-bit float weights behind a float32 interface: returns a module whose forward casts
// its tensor input to the 16-bit type, runs the converted model, and casts the result back.
torch::jit::Module ConvertHalf(const torch::jit::Module& module, const HalfPrecisionSpec& spec);

// Static INT8: folds conv-bn, observes activations on `calibration` batches (each already
// on the CPU), and converts to quantized ops. Returns the new module.
torch::jit::Module QuantizeStatic(const torch::jit::Module& module, const StaticQuantSpec& spec,
                                  const std::vector<at::Tensor>& calibration);

}  // namespace pare::engine
