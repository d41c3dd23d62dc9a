// Static INT8 with accuracy control: mixed precision chosen on measured accuracy (NNCF's
// quantize_with_accuracy_control, in C++ and on the worker that runs the job).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/recipe.h"
#include "worker/engine/score.h"

namespace pare::engine {

// The whole model in static INT8 (QuantizeStatic with `spec`); when its score (`scorer`, whose
// reference is `model`) drops by more than spec.max_accuracy_drop points, each layer's gain when
// it alone stays float is measured, and layers are kept float in that order until the drop is
// within the goal. The notes name every layer kept float, its measured gain and the drop reached,
// or say (WARNING) that the goal was not reached with every layer tried. `progress` (may be
// empty) gets the search's progress and may throw Cancelled. `kept_float` (may be null) gets
// the layers kept float: with spec.exclude, the plain recipe that rebuilds the result.
// `out_of_time` (may be empty) ends the search early when it returns true: layers not measured
// yet are tried after the measured ones, and reverting stops where it is (the notes say so).
torch::jit::Module QuantizeWithAccuracyControl(
    const torch::jit::Module& model, const StaticQuantSpec& spec, const std::vector<at::Tensor>& calibration,
    const std::vector<std::vector<at::Tensor>>& more, const Scorer& scorer, std::vector<std::string>& notes,
    const std::function<void(double, const std::string&)>& progress,
    std::vector<std::string>* kept_float = nullptr, const std::function<bool()>& out_of_time = nullptr);

}  // namespace pare::engine
