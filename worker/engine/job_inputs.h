// What a job feeds the model, checked before any work starts: forward's inputs against the
// job's input shapes, the datasets loaded and fitted to them, and the input shape itself (the
// job's, else taken from the data, else the default). Internal to the engine.
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/dataset.h"
#include "worker/engine/engine.h"
#include "worker/engine/recipe.h"

namespace pare::engine {

struct JobInputs {
  Dataset eval, calibration, train;  // empty where the job gave none
  std::vector<int64_t> shape;        // the first input's, batch first (1 unless the job said)
  std::string shape_note;            // how the shape was chosen, when the job gave none

  // Where agreement samples come from: the eval set, else the calibration set, else none.
  const Dataset* SampleSource() const {
    return eval.size() ? &eval : (calibration.size() ? &calibration : nullptr);
  }
  // What static INT8 observes: the calibration set, else the train set, else none.
  const Dataset* StepCalibration() const {
    return calibration.size() ? &calibration : (train.size() ? &train : nullptr);
  }
};

// Checks forward's inputs against the job's shapes, loads the datasets, checks that the steps'
// data needs are met and that every dataset fits the model's inputs. `model` runs once on a
// sample where a rank-3 dataset is ambiguous (ResolveRank3Datasets). Throws EngineError naming
// the field at fault (MODEL_INPUTS, BAD_INPUT_SHAPE, NO_TRAIN_DATA, BAD_DATASET).
JobInputs PrepareJobInputs(torch::jit::Module& model, const std::vector<StepSpec>& steps,
                           const CompressOptions& options);

}  // namespace pare::engine
