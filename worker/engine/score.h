// Scoring candidate models against the model they came from, for the searches that compare many
// (the analyze step's table, static INT8's accuracy control, auto): top-1 on a labelled eval set,
// else how close every output stays to the reference model's on the samples (the worst output's
// score: a model with a class head and a box head is judged on both).
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/dataset.h"

namespace pare::engine {

// The images accuracy is computed on: at most this many of the eval set, to bound the cost of
// searches that score a model many times.
constexpr int64_t kScoreEvalImages = 512;

struct ScoreOptions {
  int64_t max_eval_images = kScoreEvalImages;
  // Without labels: the share of inputs whose top-1 class is the reference's (what "accuracy"
  // means for a search against the original) instead of the centred cosine, for the first output
  // when it has classes ([N, C, ...], C > 1) and the reference's top-1 is not one class for every
  // input (there agreement cannot see damage: a constant output agrees with it). Other outputs
  // (a box head, auxiliary logits): centred cosine.
  bool top1_agreement = false;
  c10::Device device = c10::kCPU;  // where float models run (quantized ones on the CPU)
  std::string samples = {};        // what the samples are, for metric(): "eval images (no labels)"
};

class Scorer {
 public:
  // `reference`: the model candidates are compared with (its own score is its top-1, or 1).
  Scorer(torch::jit::Module& reference, const Dataset* eval, const at::Tensor& samples,
         const std::vector<at::Tensor>& more_samples, const ScoreOptions& options = {});
  // In [0, 1]: top-1 accuracy; else the least over the outputs of each one's top-1 agreement or
  // centred cosine (below 0 counts as 0) with the reference's.
  double Score(torch::jit::Module& m) const;
  // Score() and, from the same run, how close the outputs stay to the reference's: the least over
  // the outputs of the centred cosine (a continuous measure, where top-1 moves in steps of one
  // image: what ranks layers by their effect when a few images decide the score).
  struct Scores {
    double score = 0;
    double closeness = 0;
  };
  Scores ScoreAndCloseness(torch::jit::Module& m) const;
  // "top-1 accuracy on 512 eval images", "centred cosine with the reference's outputs on 32 inputs".
  const std::string& metric() const { return metric_; }
  // What a score measures, in a few words: "top-1 accuracy", "top-1 agreement" or "centred cosine"
  // (of the first output; metric() says more).
  const std::string& measure() const { return measure_; }
  // What the metric cannot see, if anything ("the original's output has one top-1 class for every
  // input..."): for a note beside it.
  const std::string& caveat() const { return caveat_; }
  bool labelled() const { return labels_.defined(); }

 private:
  std::vector<std::pair<std::string, at::Tensor>> Outputs(torch::jit::Module& m) const;

  at::Tensor images_, labels_;
  std::vector<std::pair<std::string, at::Tensor>> reference_;  // every output, by name
  std::vector<bool> agreement_;  // per output: top-1 agreement (else centred cosine), without labels
  std::vector<at::Tensor> more_;
  std::string metric_, measure_, caveat_;
  c10::Device device_ = c10::kCPU;
};

// A conv or linear node of the model's inlined forward and the layer (module path) it belongs to.
struct LayerNode {
  std::string layer;  // "layer1.0.conv1"
  std::string op;     // "aten::conv2d"
};

// The conv and linear layers on weight attributes, in execution order (from an inlined clone).
std::vector<LayerNode> LayersInOrder(const torch::jit::Module& model);

}  // namespace pare::engine
