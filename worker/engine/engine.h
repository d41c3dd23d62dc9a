// The compression engine's entry point: load a TorchScript model, run a recipe's steps
// one after the other, measure every intermediate model, and write the result.
// Depends on LibTorch only; shared by pare-worker and the offline `pare compress`.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "worker/engine/cpu_features.h"
#include "worker/engine/recipe.h"
#include "worker/engine/report.h"

namespace pare::engine {

struct ProgressUpdate {
  int step_index = 0;  // 0-based; step_count while measuring the result
  int step_count = 0;
  std::string step;
  double fraction = 0;  // of the whole job, in [0, 1]
  std::string message;
};

// Returns false to ask the engine to stop (it then throws Cancelled).
using ProgressFn = std::function<bool(const ProgressUpdate&)>;

struct DatasetInput {
  std::string format;  // "tensors" or "idx"
  std::string path;    // a file, or a folder holding the format's files
};

struct CompressOptions {
  // "cpu", "cuda" or "auto"; training and measurements run there.
  std::string device = "auto";
  // Input shape for measurements; empty means [1, 3, 224, 224].
  std::vector<int64_t> input_shape;
  // The shapes of forward's further tensor inputs, for a model that takes several (a pair of
  // images): those inputs are synthetic (datasets hold one images tensor).
  std::vector<std::vector<int64_t>> more_input_shapes;
  // Models other than the input that steps name (distill's teacherModel/studentModel), by id.
  std::map<std::string, std::string> models;
  std::optional<DatasetInput> calibration;
  std::optional<DatasetInput> train;
  std::optional<DatasetInput> eval;
  // Batch sizes to time. Empty: batch 1, and 32 too on a GPU (where batching is what a GPU is
  // for); a CPU job times batch 32 only when asked, as it costs 32 times a batch-1 run.
  std::vector<int> latency_batches;
  // Seconds the job spends timing models, warm-up included: shared evenly by the models it
  // measures (the original and each step's result) and the batch sizes, each at least 2 warm-up
  // and 3 timed runs. An auto step's trials are each timed with the whole of it.
  double latency_budget_seconds = 0.5;
  // Where the original model's latency is kept between jobs (LatencyCache), under a key that
  // includes `model_digest` (the input file's SHA-256, computed by the caller, who usually has
  // it already). Either empty: the original is timed every time.
  std::string latency_cache_dir;
  std::string model_digest;
  // Inputs used to compare every step's outputs with the original's.
  int agreement_samples = 32;
  // Seed for synthetic inputs.
  uint64_t seed = 0;
  ProgressFn progress;
  // An auto step's trials an earlier attempt of this job finished (its checkpoint records):
  // the search takes them as they are instead of running them again.
  nlohmann::json resume_trials = nlohmann::json::array();
  // Gets the auto step's trial records after each trial, to be kept where a later attempt finds them.
  std::function<void(const nlohmann::json&)> checkpoint;
};

// Runs `steps` on the model at `input_path` and writes the final model to `output_path`.
// Throws EngineError (bad model, bad data, a step that cannot apply) or Cancelled. A job that
// fails with a model and a report worth keeping (auto's GOAL_UNREACHABLE) returns them with
// Report::failure set.
Report Compress(const std::string& input_path, const std::vector<StepSpec>& steps,
                const CompressOptions& options, const std::string& output_path);

// Sets process-wide LibTorch settings once (quantized engine, thread count). `num_threads` 0
// means the CPUs this process may use (UsableCpus: affinity mask and cgroup quota), not
// LibTorch's own guess (1 on some 2-core VMs), split evenly between `cpu_share` workers that
// share them (ThreadsFor). Returns what it set, and why, for the logs; the reports say it too.
struct ThreadChoice {
  int threads = 1;
  std::string why;  // "--threads 4", or UsableCpus' reason
};
ThreadChoice InitProcess(int num_threads, const std::string& quantized_engine = "", int cpu_share = 1);
// The threads a job runs on: `num_threads` when set, else the usable CPUs divided between the
// `cpu_share` workers of one machine (at least 1 each): two local workers on 8 CPUs get 4 each,
// not 8 each (16 OpenMP threads spinning on 8 cores made each job's timings several times worse).
ThreadChoice ThreadsFor(int num_threads, const CpuBudget& usable, int cpu_share);

// The BLAS this process runs LibTorch's matrix products on, e.g. "OpenBLAS 0.3.21 (OpenMP)",
// for the worker's start-up log.
std::string BlasName();

}  // namespace pare::engine
