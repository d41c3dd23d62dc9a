#include "worker/engine/score.h"

#include <algorithm>

#include "worker/engine/graph_edit.h"
#include "worker/engine/measure.h"
#include "worker/engine/model_util.h"

namespace pare::engine {

Scorer::Scorer(torch::jit::Module& reference, const Dataset* eval, const at::Tensor& samples,
               const std::vector<at::Tensor>& more_samples, const ScoreOptions& options)
    : device_(options.device) {
  std::string on;  // what the scores are computed on
  if (eval && eval->labels.defined()) {
    const int64_t n = std::min<int64_t>(options.max_eval_images, eval->images.size(0));
    images_ = eval->images.slice(0, 0, n);
    labels_ = eval->labels.slice(0, 0, n);
    for (const at::Tensor& t : eval->more_images) more_.push_back(t.slice(0, 0, n));
    measure_ = "top-1 accuracy";
    on = std::to_string(n) + " eval images";
    metric_ = measure_ + " on " + on;
  } else {
    images_ = samples;
    more_ = more_samples;
    on = std::to_string(samples.size(0)) + " " +
         (options.samples.empty() ? std::string("inputs") : options.samples);
  }
  reference_ = Outputs(reference);
  const at::Tensor& first = reference_.front().second;
  if (labels_.defined() && (first.dim() < 2 || first.numel() != first.size(0) * first.size(1))) {
    labels_ = at::Tensor();  // a dense output has no per-image class: agreement instead
  }
  if (labels_.defined()) return;
  // Without labels, each output is judged against the reference's.
  bool constant = false;  // the first output's top-1 is one class for every input
  for (const auto& [name, out] : reference_) {
    // The first output is the model's answer (its classes); the others (a box head, auxiliary
    // logits, features) are judged by how close they stay.
    bool classes = agreement_.empty() && options.top1_agreement && out.dim() >= 2 && out.size(1) > 1;
    if (classes && out.size(0) > 1 && (out.argmax(1) == out.argmax(1).flatten()[0]).all().item<bool>()) {
      classes = false;
      constant = true;
    }
    agreement_.push_back(classes);
  }
  measure_ = agreement_.front() ? "top-1 agreement" : "centred cosine";
  metric_ = measure_ + " with the " + (options.top1_agreement ? "original's" : "reference model's") +
            " outputs on " + on;
  if (reference_.size() > 1)
    metric_ += " (the worst of its " + std::to_string(reference_.size()) + " outputs" +
               (agreement_.front() ? ", the others by centred cosine)" : ")");
  if (constant) {
    caveat_ = std::string("the original's ") + (reference_.size() > 1 ? "first " : "") +
              "output has one top-1 class for every input, where agreement could not see damage: it is "
              "judged by its centred cosine";
  }
}

double Scorer::Score(torch::jit::Module& m) const { return ScoreAndCloseness(m).score; }

Scorer::Scores Scorer::ScoreAndCloseness(torch::jit::Module& m) const {
  const auto outs = Outputs(m);
  Scores s;
  if (labels_.defined())
    s.score = (outs.front().second.flatten(1).argmax(1) == labels_).to(at::kFloat).mean().item<double>();
  // CompareOutputs names a difference in the outputs' number or shapes in the report; both
  // scores are 0 here.
  if (outs.size() != reference_.size()) return s;
  double closest = 1, worst = 1;
  for (size_t k = 0; k < outs.size(); ++k) {
    const at::Tensor& out = outs[k].second;
    const at::Tensor& ref = reference_[k].second;
    if (out.sizes() != ref.sizes()) return {labels_.defined() ? s.score : 0.0, 0.0};
    const double cosine =
        std::max(0.0, OutputCosines(out.reshape({out.size(0), -1}), ref.reshape({ref.size(0), -1})).second);
    closest = std::min(closest, cosine);
    // Without labels, per position for a dense output ([N, C, H, W]: a class per pixel).
    if (!labels_.defined())
      worst = std::min(worst, agreement_[k]
                                  ? (out.argmax(1) == ref.argmax(1)).to(at::kFloat).mean().item<double>()
                                  : cosine);
  }
  s.closeness = closest;
  if (!labels_.defined()) s.score = worst;
  return s;
}

std::vector<std::pair<std::string, at::Tensor>> Scorer::Outputs(torch::jit::Module& m) const {
  const c10::Device device = PackedWeights(m).empty() ? device_ : c10::Device(c10::kCPU);
  m.to(device);
  auto outs = RunBatchedOutputs(m, images_, device, 64, nullptr, more_);
  for (auto& [name, t] : outs) t = t.to(at::kFloat);
  return outs;
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
