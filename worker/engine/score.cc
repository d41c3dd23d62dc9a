#include "worker/engine/score.h"

#include <algorithm>

#include "worker/engine/graph_edit.h"
#include "worker/engine/measure.h"
#include "worker/engine/model_util.h"

namespace pare::engine {

Scorer::Scorer(torch::jit::Module& reference, const Dataset* eval, const at::Tensor& samples,
               const std::vector<at::Tensor>& more_samples, const ScoreOptions& options)
    : device_(options.device) {
  if (eval && eval->labels.defined()) {
    const int64_t n = std::min<int64_t>(options.max_eval_images, eval->images.size(0));
    images_ = eval->images.slice(0, 0, n);
    labels_ = eval->labels.slice(0, 0, n);
    for (const at::Tensor& t : eval->more_images) more_.push_back(t.slice(0, 0, n));
    metric_ = "top-1 accuracy on " + std::to_string(n) + " eval images";
  } else {
    images_ = samples;
    more_ = more_samples;
    metric_ =
        "centred cosine with the reference model's outputs on " + std::to_string(samples.size(0)) + " inputs";
  }
  reference_ = Outputs(reference);
  if (labels_.defined() &&
      (reference_.dim() < 2 || reference_.numel() != reference_.size(0) * reference_.size(1))) {
    // A dense output has no per-image class: agreement instead.
    labels_ = at::Tensor();
    metric_ = "centred cosine with the reference model's outputs on " + std::to_string(images_.size(0)) +
              " eval images";
  }
  agreement_ =
      options.top1_agreement && !labels_.defined() && reference_.dim() >= 2 && reference_.size(1) > 1;
  if (agreement_) {
    metric_ = "top-1 agreement with the original's outputs on " + std::to_string(images_.size(0)) + " " +
              (options.samples.empty() ? "inputs" : options.samples);
  }
}

double Scorer::Score(torch::jit::Module& m) const {
  at::Tensor out = Outputs(m);
  if (labels_.defined()) return (out.flatten(1).argmax(1) == labels_).to(at::kFloat).mean().item<double>();
  // Per position for a dense output ([N, C, H, W]: a class per pixel).
  if (agreement_) return (out.argmax(1) == reference_.argmax(1)).to(at::kFloat).mean().item<double>();
  return OutputCosines(out.reshape({out.size(0), -1}), reference_.reshape({reference_.size(0), -1})).second;
}

at::Tensor Scorer::Outputs(torch::jit::Module& m) const {
  const c10::Device device = PackedWeights(m).empty() ? device_ : c10::Device(c10::kCPU);
  m.to(device);
  return RunBatched(m, images_, device, 64, nullptr, more_).to(at::kFloat);
}

// The conv and linear layers in execution order, from an inlined clone's forward.
std::vector<LayerNode> LayersInOrder(const torch::jit::Module& model) {
  torch::jit::Module flat = model.clone();
  flat.eval();
  auto graph = InlineForward(flat);
  torch::jit::Value* self = graph->inputs()[0];
  std::vector<LayerNode> out;
  ForEachNode(graph->block(), [&](torch::jit::Node* n) {
    if (LayerOpOf(n) == LayerOp::kNone) return;
    Source w = Resolve(flat, n->input(1), self);
    if (w.kind != Source::kAttr || w.path.size() < 2) return;
    out.push_back({Join(AttrPath(w.path.begin(), w.path.end() - 1)), n->kind().toQualString()});
  });
  return out;
}

}  // namespace pare::engine
