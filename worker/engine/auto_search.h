// The auto step: compression to a goal. Candidate recipes (channel pruning at several MACs
// targets recovered by distillation, static INT8 with per-layer float fallback, dynamic INT8,
// factorization, freezing, and combinations of a pruned model with INT8 or freezing) are built,
// saved, reloaded and measured on this worker, within a time budget; the result is the candidate
// with the best measured objective whose accuracy drop is within the goal.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/script.h>
#include <nlohmann/json.hpp>

#include "worker/engine/measure.h"
#include "worker/engine/recipe.h"
#include "worker/engine/report.h"
#include "worker/engine/steps.h"

namespace pare::engine {

struct AutoContext {
  const StepContext* step = nullptr;        // data, shapes, seed; step->train.progress gets the search's
  const MeasureContext* measure = nullptr;  // how the job measures a model (device, reference, latency)
  const ModelStats* original = nullptr;     // the original as the job measured it
  const Dataset* eval = nullptr;            // the job's eval set, with or without labels (may be null)
  std::string work_prefix;                  // trial files are <work_prefix>.trial<N>
  // Trial records an earlier attempt of the job checkpointed (matched by their "key"): not run again.
  nlohmann::json resume = nlohmann::json::array();
  // Gets the records of every trial finished so far, after each trial (may be empty).
  std::function<void(const nlohmann::json&)> checkpoint;
};

struct AutoResult {
  torch::jit::Module module;  // the best candidate within the goal, else the closest one
  std::vector<std::string> notes;
  // goal, metric, host, trials (recipe, score, drop, stats, wall time), front, chosen, recipe, why.
  nlohmann::json search;
  std::string unreachable;  // set when no candidate met the goal: what came closest, what blocks it
};

// Throws Cancelled (through the progress function) and EngineError when the model cannot be
// scored at all; a candidate that fails is recorded as a failed trial and the search goes on.
AutoResult AutoSearch(const torch::jit::Module& model, const AutoSpec& spec, const AutoContext& ctx);

// A step in the recipe JSON form `pare compress --recipe` takes ({"prune": {"channel": ...}}),
// for the kinds a search produces.
nlohmann::json RecipeStepJson(const StepSpec& step);

}  // namespace pare::engine
