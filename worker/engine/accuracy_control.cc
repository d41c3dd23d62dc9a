#include "worker/engine/accuracy_control.h"

#include <algorithm>
#include <cstdio>
#include <set>

#include "worker/engine/error.h"
#include "worker/engine/quant_passes.h"
#include "worker/engine/quantize.h"

namespace pare::engine {
namespace {

// The most layers whose gain is measured one by one (each costs a quantization).
constexpr size_t kMaxRanked = 64;

std::string Points(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

// What one accuracy-controlled quantization works with.
struct Control {
  const torch::jit::Module& model;
  const StaticQuantSpec& spec;
  const std::vector<at::Tensor>& calibration;
  const std::vector<std::vector<at::Tensor>>& more;
  const Scorer& scorer;
  const std::function<void(double, const std::string&)>& progress;
  const std::function<bool()>& out_of_time;

  bool Late() const { return out_of_time && out_of_time(); }
  void Progress(double fraction, const std::string& what) const {
    if (progress) progress(fraction, "accuracy control: " + what);
  }
  // The model quantized with `extra` layers kept float too.
  torch::jit::Module Quantize(const std::vector<std::string>& extra, std::vector<std::string>& notes) const {
    StaticQuantSpec s = spec;
    s.also_float = extra;  // named in this control's own note, not as the recipe's exclude
    return QuantizeStatic(model, s, calibration, &notes, more);
  }
};

// The layers that may be kept float, in execution order (those `exclude` names are float already).
std::vector<std::string> Candidates(const Control& c) {
  std::vector<std::string> layers;
  std::set<std::string> excluded(c.spec.exclude.begin(), c.spec.exclude.end());
  for (const auto& n : LayersInOrder(c.model)) {
    if (!UnderAny(n.layer, excluded) && std::find(layers.begin(), layers.end(), n.layer) == layers.end())
      layers.push_back(n.layer);
  }
  return layers;
}

// What keeping one layer float gains: in score (top-1, agreement) and in closeness to the float
// model's outputs (centred cosine).
struct Gain {
  double score = 0;
  double closeness = 0;
  std::string layer;
};

// Each layer's gain when it alone stays float (`full`: the scores with none float), most first;
// the layers not measured (past kMaxRanked, or once the time ran out: `*stopped`) follow with no
// gain, in execution order. `*ranked`: how many were measured. Ranked by the score's gain; the
// score moves in steps of one image, so layers often tie, and a tie goes to the layer whose
// float-ness brings the outputs closer to the float model's (measured on every image), not to
// the earlier one. (Ranking by closeness alone was tried: on a random-weight ResNet-18 scored by
// top-1 on 128 images it needed 18 layers float where the score's ranking needed 11.)
std::vector<Gain> RankByGain(const Control& c, const std::vector<std::string>& layers,
                             const Scorer::Scores& full, size_t* ranked, bool* stopped) {
  *ranked = std::min(layers.size(), kMaxRanked);
  std::vector<Gain> gains;
  for (size_t i = 0; i < *ranked; ++i) {
    if (c.Late()) {
      *ranked = i;
      *stopped = true;
      break;
    }
    c.Progress(0.5 * double(i) / double(*ranked), "measuring " + layers[i]);
    std::vector<std::string> ignored;
    try {
      torch::jit::Module alone = c.Quantize({layers[i]}, ignored);
      const Scorer::Scores s = c.scorer.ScoreAndCloseness(alone);
      gains.push_back({s.score - full.score, s.closeness - full.closeness, layers[i]});
    } catch (const EngineError&) {
      gains.push_back({0.0, -1.0, layers[i]});  // measured as no gain: tried last
    }
  }
  std::stable_sort(gains.begin(), gains.end(), [](const Gain& a, const Gain& b) {
    return a.score != b.score ? a.score > b.score : a.closeness > b.closeness;
  });
  for (size_t i = *ranked; i < layers.size(); ++i) gains.push_back({0.0, -1.0, layers[i]});
  return gains;
}

}  // namespace

torch::jit::Module QuantizeWithAccuracyControl(
    const torch::jit::Module& model, const StaticQuantSpec& spec, const std::vector<at::Tensor>& calibration,
    const std::vector<std::vector<at::Tensor>>& more, const Scorer& scorer, std::vector<std::string>& notes,
    const std::function<void(double, const std::string&)>& progress, std::vector<std::string>* kept_float,
    const std::function<bool()>& out_of_time) {
  const Control c{model, spec, calibration, more, scorer, progress, out_of_time};
  const double max_drop = spec.max_accuracy_drop.value_or(0.0);
  if (kept_float) kept_float->clear();
  torch::jit::Module float_model = model;
  const double base = scorer.Score(float_model);
  auto drop = [&](double score) { return (base - score) * 100.0; };
  std::vector<std::string> q_notes;
  torch::jit::Module q = c.Quantize({}, q_notes);
  const Scorer::Scores full_scores = scorer.ScoreAndCloseness(q);
  const double full = full_scores.score;
  const std::string goal = "accuracy control: at most " + Points(max_drop) + " points of " + scorer.metric() +
                           " (float: " + Points(base * 100) + ")";
  if (drop(full) <= max_drop) {
    notes.insert(notes.end(), q_notes.begin(), q_notes.end());
    notes.push_back(goal + "; every layer in INT8 loses " + Points(drop(full)) + ": none kept float");
    return q;
  }
  const std::vector<std::string> layers = Candidates(c);
  size_t ranked = 0;
  bool stopped = false;  // the time ran out before the search ended
  const auto gains = RankByGain(c, layers, full_scores, &ranked, &stopped);
  // Keep layers float, most sensitive first, until the drop is within the goal.
  std::vector<std::string> kept;
  std::string reverted;
  double reached = drop(full);
  for (size_t i = 0; i < gains.size() && reached > max_drop; ++i) {
    if (c.Late()) {
      stopped = true;
      break;
    }
    c.Progress(0.5 + 0.5 * double(i) / double(gains.size()), "keeping " + gains[i].layer + " float");
    kept.push_back(gains[i].layer);
    q_notes.clear();
    try {
      q = c.Quantize(kept, q_notes);
    } catch (const EngineError& e) {
      if (e.reason() != kReasonBadRecipe) throw;
      kept.pop_back();  // not a layer `exclude` can name (a conv in a module of its own kind)
      continue;
    }
    reached = drop(scorer.Score(q));
    reverted += (reverted.empty() ? "" : ", ") + gains[i].layer + " (" + (gains[i].score < 0 ? "" : "+") +
                Points(gains[i].score * 100) + ", cosine " + (gains[i].closeness < 0 ? "" : "+") +
                Points(gains[i].closeness) + ")";
  }
  notes.insert(notes.end(), q_notes.begin(), q_notes.end());
  const std::string measured = std::to_string(ranked) + " of " + std::to_string(layers.size()) + " layers";
  std::string summary = goal + "; every layer in INT8 loses " + Points(drop(full)) + "; kept " +
                        std::to_string(kept.size()) + " of " + std::to_string(layers.size()) +
                        " layer(s) float, most sensitive first (gain when float alone, in points and, "
                        "for ties, in centred cosine): " +
                        reverted + "; now loses " + Points(reached);
  if (reached > max_drop) {
    summary = "WARNING: " + summary +
              (stopped ? ", still above the goal when the time ran out (" + measured + " measured)"
                       : ", still above the goal with every layer tried");
  } else if (!layers.empty() && kept.size() == layers.size()) {
    // Within the goal only with nothing quantized: say so as loudly as a miss.
    summary =
        "WARNING: " + summary +
        ": every conv/linear layer stayed float, the result computes as the float "
        "model does; no layer can be quantized within this goal (a looser maxAccuracyDrop, or static INT8 "
        "without it, quantizes)";
  } else if (stopped) {
    summary +=
        " (the time ran out after " + measured + " were measured: the rest were tried in execution order)";
  }
  notes.push_back(summary);
  if (kept_float) *kept_float = kept;
  return q;
}

}  // namespace pare::engine
