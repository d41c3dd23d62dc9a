// What the engine measured about a model, for the original and after every step.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace pare::engine {

struct CpuFeatures;

struct LayerSparsity {
  std::string name;
  uint64_t parameters = 0;
  uint64_t zeros = 0;
};

struct Latency {
  int batch = 1;
  double p50_ms = 0;
  double p95_ms = 0;
  int iterations = 0;
  double seconds = 0;  // spent timing, warm-up included (for the job's budget; not reported)
};

struct OutputAgreement {
  std::string name;  // "[1]", "cls", ... (see OutputTensors)
  double cosine = 1.0;
  double centred_cosine = 1.0;
};

struct ModelStats {
  uint64_t size_bytes = 0;
  uint64_t deflated_bytes = 0;
  uint64_t parameters = 0;  // float parameters plus the elements of packed quantized weights
  uint64_t nonzero_parameters = 0;
  std::vector<Latency> latency;
  std::optional<double> macs;  // one forward pass at batch 1
  std::optional<double> top1_accuracy;
  std::optional<double> top5_accuracy;
  // Share of inputs (of positions, for a dense output) whose arg-max over dimension 1 matches the original's.
  double top1_agreement = 1.0;
  // Agreement with the original's outputs on the same inputs (the worst output's, when forward
  // returns several): the mean cosine, and the mean cosine of what the outputs vary by input
  // (each centred on the original's mean output), which a constant-output model fails.
  double output_cosine = 1.0;
  double output_centred_cosine = 1.0;
  std::vector<OutputAgreement> outputs;  // per output, when forward returns several tensors
  std::vector<LayerSparsity> layers;
};

struct StepReport {
  std::string step;  // "original" or a step name
  ModelStats stats;
  double wall_seconds = 0;   // applying the step and saving its model
  double check_seconds = 0;  // loading the saved model back, to prove it loads on its own
  std::vector<std::string> notes;
  nlohmann::json sensitivity;  // the analyze step's per-layer table (null for other steps)
};

// The machine a job ran on: what its latencies and INT8 gains depend on.
struct HostInfo {
  std::string cpu;         // the CPU's brand string
  std::string extensions;  // "AVX2, AVX-512, AVX-512 VNNI"
  bool fast_int8 = false;  // int8 products summed in 32 bits (AVX-512 VNNI or AMX)
  int threads = 0;         // LibTorch's intra-op threads
  std::string threads_why;
  std::string blas;
};

// A job that ends FAILED although it has a model and a report to give (an `auto` search whose
// goal no candidate met: the closest model and every trial are still worth downloading).
struct JobFailure {
  std::string code = "FAILED_PRECONDITION";
  std::string reason;
  std::string message;
};

struct Report {
  std::string device;
  HostInfo host;
  std::vector<int64_t> input_shape;
  std::vector<std::vector<int64_t>> more_input_shapes;  // forward's further inputs, if any
  std::vector<StepReport> steps;
  // An auto step's search: goal, metric, trials, Pareto front, the chosen trial and its recipe.
  nlohmann::json search;
  std::optional<JobFailure> failure;
};

// Warnings for a step that made the model slower: one per batch size whose p50 latency grew by
// more than `tolerance` (a share) from `before` to `after` — the "smaller but not faster"
// case (INT8 of a model whose activations LibTorch cannot keep quantized, a pruned conv that
// falls to a slower kernel), said in the report rather than left for the user to find.
std::vector<std::string> SlowdownNotes(const ModelStats& before, const ModelStats& after, double tolerance);

// A note per batch size whose timing was unsteady (p95 more than twice the p50): another process
// busy on the same cores, or runs too few for a steady figure (a short --latency-budget). Speeds
// compared against such a p50 may be far off; the report says so rather than leave it unseen.
std::vector<std::string> UnsteadyTimingNotes(const ModelStats& stats);

// On a CPU without a fast int8 path (x86 without AVX-512 VNNI/AMX): what static INT8 gained
// at batch 1 on it, and that channel pruning is the lever there.
std::string Int8GainNote(const ModelStats& before, const ModelStats& after, const CpuFeatures& cpu);

nlohmann::json ToJson(const ModelStats& s);
nlohmann::json ToJson(const Report& r);

}  // namespace pare::engine
