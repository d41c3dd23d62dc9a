// The engine's own description of a recipe: plain C++ (no protobuf, no torch),
// built from the proto Recipe by worker/recipe_convert.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace pare::engine {

struct MagnitudePruneSpec {
  double amount = 0.5;               // fraction of weights set to zero, in [0, 1)
  bool global = false;               // one threshold over all selected layers
  std::vector<std::string> include;  // substrings of layer names; empty = all
  std::vector<std::string> exclude = {};
};

struct NMPruneSpec {
  int n = 2;  // weights kept in every group of m along the input dimension
  int m = 4;
};

// Structured pruning: whole channels removed from every coupled layer.
struct ChannelPruneSpec {
  double amount = 0.5;           // fraction of channels removed, in [0, 1)
  std::string criterion = "L1";  // L1 or L2 norm of the group's producer filters, or BN_SCALE
  bool global = false;           // one threshold over all groups (normalised scores) or uniform
  int round_to = 8;              // kept channels rounded to a multiple where the group is wide enough
  double target_macs = 0;        // > 0: search the amount that keeps at most this fraction of the MACs
  // Per-group amounts by layer-name pattern (exact, prefix at a dot, or glob); the longest match wins.
  std::map<std::string, double> amounts = {};
};

// Low-rank factorization: a layer's weight W (out x in, a conv's flattened) becomes B·A by
// truncated SVD, i.e. two smaller layers, where that has fewer parameters.
struct FactorizeSpec {
  double rank_ratio = 0;  // kept rank as a fraction of min(out, in), in (0, 1]
  double energy = 0;      // else: the smallest rank keeping this fraction of sum(sigma^2), in (0, 1]
};

struct DynamicQuantSpec {};

// Static INT8 post-training quantization: conv-bn folding, per-channel symmetric int8
// weights, affine uint8 activations whose ranges come from calibration.
struct StaticQuantSpec {
  // MINMAX, MOVING_AVERAGE, HISTOGRAM (range chosen by minimising the quantization error
  // over the observed values) or PERCENTILE (99.99th percentile of the observed values).
  std::string observer = "HISTOGRAM";
  int calibration_batches = 16;  // of 8 inputs each
  bool per_channel = true;
  // The CPU the model will run on: "vnni" (AVX-512 VNNI/AMX, full 8-bit activations), "avx2"
  // (x86 without VNNI: 7-bit activations, as its int8 kernels saturate 16-bit sums of u8*s8
  // pairs) or "auto" (the CPU this process runs on).
  std::string target = "auto";
  // Module paths kept float (with everything under them); each must name a submodule.
  std::vector<std::string> exclude = {};
  // Set: keep the most sensitive layers float until the score drops by at most this many points
  // (0: not at all). Unset: the whole model in INT8, whatever it loses.
  std::optional<double> max_accuracy_drop = std::nullopt;
  // Layers accuracy control keeps float (checked as exclude is, but not reported as asked for).
  std::vector<std::string> also_float = {};
};

// Weights and buffers converted to 16-bit floats for GPU deployment; the model keeps a
// float32 interface (it casts its input and its output).
struct HalfPrecisionSpec {
  bool bf16 = false;  // bfloat16 instead of IEEE float16
};

// Supervised training settings shared by finetune and distill.
struct TrainSpec {
  int epochs = 1;
  double learning_rate = 0.01;
  int batch_size = 64;
  std::string optimizer = "SGD";  // SGD (momentum 0.9) or ADAM; cosine learning-rate schedule
  double weight_decay = 5e-4;
};

struct FinetuneSpec {
  TrainSpec train;
};

// Knowledge distillation: the job's input model teaches the current model with
// loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).
struct DistillSpec {
  TrainSpec train;
  // Other uploaded models by id (resolved to files through CompressOptions::models): the
  // teacher instead of the job's input model, the student instead of the current model.
  std::string teacher_model;
  std::string student_model;
  double temperature = 4.0;
  double alpha = 0.7;
};

// Freezing for inference (OptimizeForInference): the result no longer trains.
struct OptimizeSpec {};

// A per-layer sensitivity table (Analyze); the model is unchanged.
struct AnalyzeSpec {
  std::vector<double> prune_amounts = {0.25, 0.5, 0.75};
  int max_layers = 64;
  bool quantize = true;
  bool prune = true;
  int round_to = 8;  // as prune.channel rounds kept channels
};

// Automatic compression to a goal (AutoSearch): candidate recipes tried, measured on this
// worker, and the best one within the accuracy goal kept. The recipe's only step.
struct AutoSpec {
  double max_accuracy_drop = 1.0;  // top-1 points on the eval set (or % of the baseline: relative)
  bool relative = false;
  std::string objective = "LATENCY";  // LATENCY (p50, batch 1), SIZE (file bytes) or MACS
  double target_speedup = 0;          // > 0: a candidate this much better may end the search early
  double time_budget_seconds = 900;
  // Subset of prune.channel, distill, quantize.static, quantize.dynamic, factorize, optimize; empty = all.
  std::vector<std::string> methods = {};
};

using StepSpec = std::variant<MagnitudePruneSpec, NMPruneSpec, ChannelPruneSpec, FactorizeSpec,
                              DynamicQuantSpec, StaticQuantSpec, HalfPrecisionSpec, FinetuneSpec, DistillSpec,
                              OptimizeSpec, AnalyzeSpec, AutoSpec>;

// The name a step has in reports and progress, e.g. "prune.magnitude".
inline std::string StepName(const StepSpec& s) {
  struct V {
    std::string operator()(const MagnitudePruneSpec&) const { return "prune.magnitude"; }
    std::string operator()(const NMPruneSpec&) const { return "prune.nm"; }
    std::string operator()(const ChannelPruneSpec&) const { return "prune.channel"; }
    std::string operator()(const FactorizeSpec&) const { return "factorize"; }
    std::string operator()(const DynamicQuantSpec&) const { return "quantize.dynamic"; }
    std::string operator()(const StaticQuantSpec&) const { return "quantize.static"; }
    std::string operator()(const HalfPrecisionSpec& h) const {
      return h.bf16 ? "quantize.bf16" : "quantize.fp16";
    }
    std::string operator()(const FinetuneSpec&) const { return "finetune"; }
    std::string operator()(const DistillSpec&) const { return "distill"; }
    std::string operator()(const OptimizeSpec&) const { return "optimize"; }
    std::string operator()(const AnalyzeSpec&) const { return "analyze"; }
    std::string operator()(const AutoSpec&) const { return "auto"; }
  };
  return std::visit(V{}, s);
}

// Whether the step trains on the job's train dataset.
inline bool NeedsTrainData(const StepSpec& s) {
  return std::holds_alternative<FinetuneSpec>(s) || std::holds_alternative<DistillSpec>(s);
}

// Whether the step needs the job's eval dataset (auto measures every candidate's accuracy on it).
inline bool NeedsEvalData(const StepSpec& s) { return std::holds_alternative<AutoSpec>(s); }

}  // namespace pare::engine
