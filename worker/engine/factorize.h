// Low-rank factorization of linear and convolution layers by truncated SVD.
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/recipe.h"

namespace pare::engine {

struct FactorizeResult {
  torch::jit::Module module;
  std::vector<std::string> notes;
  int factorized = 0;
};

// Factorizes a copy of `module`: every linear layer and every ungrouped convolution whose
// factors have fewer parameters than it becomes two layers (a conv k×k to rank r, then a 1×1
// conv; a linear to rank r, then a linear). The two factors are parameters of the top module
// named "factorized__<layer>__{a,b}", so the result still trains.
FactorizeResult Factorize(const torch::jit::Module& module, const FactorizeSpec& spec,
                          const std::vector<int64_t>& input_shape,
                          const std::vector<std::vector<int64_t>>& more_inputs = {});

}  // namespace pare::engine
