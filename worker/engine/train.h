// Training steps: plain fine-tuning and knowledge distillation of a TorchScript model,
// with a cosine learning-rate schedule, per-epoch evaluation and the best epoch kept.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/dataset.h"
#include "worker/engine/recipe.h"

namespace pare::engine {

struct TrainContext {
  c10::Device device = c10::kCPU;
  const Dataset* train = nullptr;  // required, with labels
  const Dataset* eval = nullptr;   // optional; with labels it picks the best epoch
  uint64_t seed = 0;
  // Called after every batch (fraction of the step done, message); throws Cancelled to stop.
  std::function<void(double, const std::string&)> progress;
};

// Trains `student` in place on ctx.train. With a teacher, distills (spec.alpha and
// temperature); without, fine-tunes with cross-entropy. Returns notes for the report.
std::vector<std::string> Train(torch::jit::Module& student, torch::jit::Module* teacher,
                               const TrainSpec& spec, double temperature, double alpha,
                               const TrainContext& ctx);

}  // namespace pare::engine
