// One recipe step applied to a module: what a step may need beyond the model (StepContext),
// the calibration batches static INT8 observes, and the dispatch from a StepSpec to its pass.
// Internal to the engine: Compress runs a job's steps through ApplyStep.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/script.h>
#include <nlohmann/json.hpp>

#include "worker/engine/analyze.h"
#include "worker/engine/dataset.h"
#include "worker/engine/model_util.h"
#include "worker/engine/recipe.h"
#include "worker/engine/train.h"

namespace pare::engine {

// Loads a TorchScript file on the CPU in eval mode. Throws EngineError(MODEL_LOAD), with a hint
// when the file is what torch.save() writes.
torch::jit::Module LoadModel(const std::string& path);

// What a step may need beyond the model itself.
struct StepContext {
  const std::string& input_path;  // the job's input model: the default teacher
  TrainContext train;
  const Dataset* calibration = nullptr;  // calibration set, else the train set, else none
  std::vector<int64_t> input_shape;
  uint64_t seed = 0;
  const std::map<std::string, std::string>* models = nullptr;  // other models by id
  InputShapes more_inputs = {};                                // forward's further inputs
  at::Tensor samples = {};  // the job's agreement samples (analyze scores on them)
  std::vector<at::Tensor> more_samples = {};
  nlohmann::json* table = nullptr;  // analyze writes its per-layer table here
};

// Calibration inputs: `batches` batches of 8 from ctx.calibration (a seeded sample), or
// standard-normal inputs of the model's shape when there is no dataset; `more` gets forward's
// further inputs for each batch. Says which in `notes`.
std::vector<at::Tensor> CalibrationBatches(const StepContext& ctx, int batches,
                                           std::vector<std::string>& notes,
                                           std::vector<std::vector<at::Tensor>>& more);

// What an analysis of the model needs from the step's context: its shapes, the eval set or the
// agreement samples, the progress (no calibration batches: the caller adds them for INT8).
AnalyzeContext AnalysisContext(const StepContext& ctx);

// Runs one step on `current` and returns the new module; `unchanged` is set when the step found
// nothing to change. Throws EngineError for what the step cannot do.
torch::jit::Module ApplyStep(torch::jit::Module current, const StepSpec& step, const StepContext& ctx,
                             std::vector<std::string>& notes, bool& unchanged);

}  // namespace pare::engine
