// Unstructured pruning passes: zeros stored in conv and linear weights.
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/recipe.h"

namespace pare::engine {

// Sets the smallest-magnitude weights to zero, per layer or with one global threshold.
// Returns notes for the report (layers skipped, threshold used).
std::vector<std::string> MagnitudePrune(torch::jit::Module& module, const MagnitudePruneSpec& spec);

// Keeps the n largest of every m consecutive weights along the input dimension.
std::vector<std::string> NMPrune(torch::jit::Module& module, const NMPruneSpec& spec);

}  // namespace pare::engine
