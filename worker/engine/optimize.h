// Freezing a model for inference: the `optimize` step.
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

namespace pare::engine {

struct OptimizeResult {
  torch::jit::Module module;
  std::vector<std::string> notes;  // what changed, and that the result no longer trains
};

// A frozen copy of `module` (eval mode): parameters and attributes become graph constants,
// batch norms fold into the convolutions before them, additions and multiplications by constants
// fold into convolutions, dropout goes, and linear layers that read the same input run as one.
// What torch.jit.optimize_for_inference adds beyond this on a CPU (oneDNN weight layouts) does
// not survive saving in LibTorch 1.13, so it is left out. Throws EngineError(OPTIMIZE_FAILED)
// when the model cannot be frozen (a forward that assigns attributes).
OptimizeResult OptimizeForInference(const torch::jit::Module& module);

}  // namespace pare::engine
