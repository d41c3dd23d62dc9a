// Quantization passes driven through LibTorch's JIT graph-mode passes.
#pragma once

#include <torch/script.h>

namespace pare::engine {

// Dynamic INT8: linear layers get int8 weights (per-tensor symmetric) and quantize
// their activations on the fly. Returns the new module; the input is left unchanged.
torch::jit::Module QuantizeDynamic(const torch::jit::Module& module);

}  // namespace pare::engine
