// The `analyze` step: a per-layer sensitivity table, measured on the worker that runs the job.
// AIMET's QuantAnalyzer and INC's diagnosis are the references; this one is JSON in the report.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/script.h>
#include <nlohmann/json.hpp>

#include "worker/engine/dataset.h"
#include "worker/engine/model_util.h"
#include "worker/engine/recipe.h"

namespace pare::engine {

struct AnalyzeContext {
  std::vector<int64_t> input_shape;  // batch first
  InputShapes more_shapes;
  // What the accuracy is measured on: a labelled eval set (top-1), else `samples` (the centred
  // cosine with the model's own outputs on them).
  const Dataset* eval = nullptr;
  at::Tensor samples;
  std::vector<at::Tensor> more_samples;
  // Static INT8's calibration batches and their further inputs.
  std::vector<at::Tensor> calibration;
  std::vector<std::vector<at::Tensor>> calibration_more;
  std::function<void(double, const std::string&)> progress;  // fraction done, message; may throw Cancelled
};

struct LayerSensitivity {
  std::string layer;                              // module path, "layer1.0.conv1"
  std::string op;                                 // "aten::conv2d"
  std::optional<double> latency_share;            // of the forward's time, profiled
  std::optional<double> int8;                     // the accuracy with only this layer INT8
  std::string group;                              // the channel group it produces, when prunable
  std::vector<std::pair<double, double>> pruned;  // (amount, accuracy) with only that group pruned
};

struct AnalyzeResult {
  std::string metric;   // what the accuracy columns are: "top-1 on 512 eval images", "centred cosine ..."
  double baseline = 0;  // the model's own figure under that metric
  std::vector<LayerSensitivity> rows;
  std::vector<std::string> notes;
};

// Measures the table for `model` (which is not changed). Throws EngineError for a model without
// conv or linear layers.
AnalyzeResult Analyze(const torch::jit::Module& model, const AnalyzeSpec& spec, const AnalyzeContext& ctx);

// The rows as the report's `sensitivity` array: {layer, op, group, latency_share, int8,
// "pruned 0.25", ...}; numbers only where measured.
nlohmann::json ToJson(const AnalyzeResult& r);

}  // namespace pare::engine
