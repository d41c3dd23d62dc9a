// Multiply-accumulates of one forward pass, counted from the real shapes that the
// convolution, linear and matrix-product ops see when the model runs.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/script.h>

namespace pare::engine {

struct MacsCount {
  double macs = 0;      // for one input (batch 1)
  int counted_ops = 0;  // conv/linear/matmul nodes that contributed
  int hidden_ops = 0;   // such nodes inside control flow, which are not counted
};

// nullopt when the model cannot be counted this way (a quantized or frozen model).
std::optional<MacsCount> CountMacs(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
                                   const std::vector<std::vector<int64_t>>& more_inputs = {});

}  // namespace pare::engine
