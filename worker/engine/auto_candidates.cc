// The candidates of each method family (see auto_search_internal.h).
#include <algorithm>
#include <cmath>

#include "worker/engine/accuracy_control.h"
#include "worker/engine/analyze.h"
#include "worker/engine/auto_search_internal.h"
#include "worker/engine/channel_prune.h"
#include "worker/engine/error.h"
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"

namespace pare::engine::auto_search_internal {

int Search::StaticInt8(const std::string& prefix, int base) {
  const double left = goal_points_ - (base < 0 ? 0.0 : trials_[base].drop);
  if (left <= 0 || Done()) return -1;
  const std::string family = base < 0 ? "static INT8" : trials_[base].family + " + static INT8";
  const int whole = Add(base, {StaticQuantSpec{}}, prefix + "static INT8", family);
  if (whole < 0 || Passes(whole) || !trials_[whole].error.empty() || Done()) return whole;
  StaticQuantSpec q;
  q.max_accuracy_drop = left;
  return Add(base, {q}, prefix + "static INT8 with accuracy control", family);
}

DistillSpec Search::Recovery(int epochs) const {
  DistillSpec d;
  d.train.epochs = epochs;
  d.train.learning_rate = 0.002;
  d.train.batch_size = 128;
  d.train.optimizer = "ADAM";
  d.temperature = 4.0;
  d.alpha = 0.7;
  return d;
}

int Search::RoundTo() {
  if (round_to_ == 0) {  // found once: the original does not change
    int64_t widest = 0;
    for (const auto& w : PrunableWeights(original_))
      if (w.is_conv) widest = std::max<int64_t>(widest, w.weight.size(0));
    round_to_ = widest >= 128 ? 8 : 1;
  }
  return round_to_;
}

int Search::RecoveryEpochs() const {
  if (epoch_seconds_ <= 0) return 1;
  return std::clamp(int(0.1 * spec_.time_budget_seconds / epoch_seconds_), 1, 8);
}

std::vector<StepSpec> Search::PrunedSteps(double target, int epochs) {
  ChannelPruneSpec p;
  p.target_macs = target;
  p.round_to = RoundTo();
  std::vector<StepSpec> steps = {p};
  if (epochs > 0) steps.push_back(Recovery(epochs));
  return steps;
}

std::string Search::PrunedName(double target, int epochs) {
  return "prune.channel " + Num(target < 0.1 ? "%.1f%% MACs" : "%.0f%% MACs", 100 * target) +
         (epochs > 0 ? " + distill " + std::to_string(epochs) + " ep" : "");
}

int Search::Pruned(double target, int epochs) {
  return Add(-1, PrunedSteps(target, epochs), PrunedName(target, epochs), "channel pruning");
}

void Search::PruneLadder() {
  const bool distill = Distills();
  if (!distill) {
    notes_.push_back(Allowed("distill")
                         ? "pruned candidates are not recovered: the job has no labelled train dataset"
                         : "pruned candidates are not recovered: distill is not among the methods");
  }
  double target = 0.5, passed = 0, failed = 0;  // the hardest target that passed, the gentlest that failed
  for (int n = 0; n < 8 && !Done(); ++n) {
    const int epochs = distill ? RecoveryEpochs() : 0;
    int i = Pruned(target, epochs);
    if (i < 0) return;
    if (!Passes(i) && trials_[i].error.empty() && distill && epochs == 1 && RecoveryEpochs() > 1) {
      i = Pruned(target, RecoveryEpochs());  // the first was a timing run: recovered for longer
      if (i < 0) return;
    }
    if (Passes(i)) {
      passed = target;
    } else if (trials_[i].error.empty()) {
      failed = std::max(failed, target);
      ladder_failed_ = failed;
    } else {
      return;  // this target cannot be built (nothing left to prune), nor any harder one
    }
    if (passed > 0 && failed > 0 && failed < passed) {
      if (passed / failed < 1.25) return;
      target = std::sqrt(passed * failed);
    } else if (passed > 0) {
      target = passed * 0.6;
    } else {
      target = (1.0 + target) / 2;
      if (target > 0.95) return;
    }
  }
}

void Search::GuidedPrune() {
  // The sensitivity analysis costs about a trial per group: only with a quarter of the budget left.
  if (ladder_failed_ <= 0 || Remaining() < 0.25 * spec_.time_budget_seconds) return;
  double target = ladder_failed_;
  for (int n = 0; n < 3 && !Done(); ++n) {
    auto amounts = GuidedAmounts(target);
    if (!amounts) return;
    ChannelPruneSpec p;
    p.amount = 0;
    p.round_to = RoundTo();
    p.amounts = *amounts;
    std::vector<StepSpec> steps = {p};
    std::string name = "prune.channel by sensitivity " + Num("%.0f%% MACs", 100 * target);
    if (Distills()) {
      steps.push_back(Recovery(RecoveryEpochs()));
      name += " + distill " + std::to_string(RecoveryEpochs()) + " ep";
    }
    const int i = Add(-1, steps, name, "channel pruning by sensitivity");
    if (i < 0 || !Passes(i)) return;
    target *= 0.75;
  }
}

bool Search::Sensitivities() {
  if (analysed_) return !group_loss_.empty();
  analysed_ = true;
  const auto t0 = Clock::now();
  AnalyzeSpec spec;
  spec.quantize = false;
  spec.round_to = RoundTo();
  AnalyzeContext a = AnalysisContext(*ctx_.step);
  struct OutOfBudget {};
  a.progress = [this](double, const std::string& msg) {
    if (Remaining() <= 0) throw OutOfBudget{};  // stops between two measurements
    Progress("sensitivity of each channel group: " + msg);
  };
  try {
    const AnalyzeResult r = Analyze(LoadModel(ctx_.step->input_path), spec, a);
    for (const auto& row : r.rows) {
      if (row.group.empty() || row.pruned.empty() || group_loss_.count(row.group)) continue;
      auto& loss = group_loss_[row.group];
      for (const auto& [amount, score] : row.pruned) loss.emplace_back(amount, (r.baseline - score) * 100);
    }
    notes_.push_back("sensitivity-guided pruning: " + std::to_string(group_loss_.size()) +
                     " channel group(s) each pruned alone at 25/50/75% (" + r.metric + ", no training) in " +
                     Num("%.1f s", std::chrono::duration<double>(Clock::now() - t0).count()));
  } catch (const Cancelled&) {
    throw;
  } catch (const OutOfBudget&) {
    group_loss_.clear();
    notes_.push_back("no sensitivity-guided pruning: the time budget ran out while measuring the groups");
  } catch (const std::exception& e) {
    notes_.push_back("no sensitivity-guided pruning: " + ErrorText(e));
  }
  return !group_loss_.empty();
}

std::optional<std::map<std::string, double>> Search::GuidedAmounts(double target) {
  if (!Sensitivities()) return std::nullopt;
  const StepContext& sc = *ctx_.step;
  try {
    if (!pruner_) {
      pruner_model_ = LoadModel(sc.input_path);
      pruner_ = std::make_unique<ChannelPruner>(pruner_model_, sc.input_shape, sc.more_inputs);
      auto macs = CountMacs(pruner_model_, sc.input_shape, sc.more_inputs);
      original_macs_ = macs ? macs->macs : 0;
    }
    if (original_macs_ <= 0) return std::nullopt;
    std::vector<double> thresholds = {0.0};
    for (const auto& [group, loss] : group_loss_)
      for (const auto& [amount, points] : loss) thresholds.push_back(std::max(0.0, points));
    std::sort(thresholds.begin(), thresholds.end());
    thresholds.erase(std::unique(thresholds.begin(), thresholds.end()), thresholds.end());
    auto amounts_at = [&](double threshold) {
      std::map<std::string, double> out;
      for (const auto& [group, loss] : group_loss_) {
        double a = 0;
        for (const auto& [amount, points] : loss)
          if (points <= threshold) a = std::max(a, amount);
        out[group] = a;
      }
      return out;
    };
    auto reaches = [&](const std::map<std::string, double>& amounts) {
      ChannelPruneSpec p;
      p.amount = 0;
      p.round_to = RoundTo();
      p.amounts = amounts;
      auto macs = CountMacs(pruner_->Prune(p).module, sc.input_shape, sc.more_inputs);
      return macs && macs->macs <= target * original_macs_;
    };
    size_t lo = 0, hi = thresholds.size();  // the first threshold that reaches the target, in [lo, hi]
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (reaches(amounts_at(thresholds[mid])))
        hi = mid;
      else
        lo = mid + 1;
    }
    if (lo == thresholds.size()) return std::nullopt;
    return amounts_at(thresholds[lo]);
  } catch (const Cancelled&) {
    throw;
  } catch (const std::exception& e) {
    notes_.push_back("no sensitivity-guided pruning: " + ErrorText(e));
    return std::nullopt;
  }
}

void Search::CombineWithPruned() {
  std::vector<int> pruned;
  for (const auto& t : trials_)
    if (t.pruned && !t.frozen && t.error.empty() && t.drop <= goal_points_) pruned.push_back(t.index);
  std::sort(pruned.begin(), pruned.end(), [&](int a, int b) { return trials_[a].ratio > trials_[b].ratio; });
  if (pruned.size() > 2) pruned.resize(2);
  for (int p : pruned) FinishPruned(p);
}

void Search::FinishPruned(int p) {
  if (spec_.objective == "MACS") return;  // INT8 and freezing keep the MACs
  if (Int8("quantize.static")) StaticInt8(trials_[p].name + " + ", p);
  if (Allowed("optimize") && !Done())
    Add(p, {OptimizeSpec{}}, trials_[p].name + " + optimize", trials_[p].family + " + freezing");
}

void Search::LongerRecovery() {
  // Only once an epoch was timed: Add starts only trials that fit in what is left (Fits).
  if (!Distills() || ladder_failed_ <= 0 || epoch_seconds_ <= 0) return;
  LongerRecoveryStep at;
  at.target = ladder_failed_;
  at.epochs = 2 * RecoveryEpochs();
  // Until the budget is spent (a trial that does not fit is not started) or the targets close in:
  // the search returns the best it found in its budget, not the first.
  double tried = 0;  // the target of the last trial
  for (int n = 0; n < 16 && !Done(); ++n) {
    // A new target's recovery longer than what is left is shortened to fit, while it stays longer
    // than the ladder's: the last minutes of the budget still try it. (A target that failed is
    // not tried again shorter.)
    const int fit = int(Remaining() / (1.3 * epoch_seconds_));
    if (at.target != tried && at.epochs > fit && fit > RecoveryEpochs()) at.epochs = fit;
    tried = at.target;
    const int i = Add(-1, PrunedSteps(at.target, at.epochs),
                      PrunedName(at.target, at.epochs) + " (longer recovery)", "channel pruning");
    if (i < 0 || !trials_[i].error.empty()) return;
    if (Passes(i)) FinishPruned(i);
    const auto next = NextLongerRecovery(at, Passes(i), 8 * RecoveryEpochs());
    if (!next) return;
    at = *next;
  }
}

void Search::Factorize() {
  FactorizeSpec f;
  f.energy = 0.9;
  // Factorized first, not recovered: distillation changes the weights, not the shapes, so this
  // trial's objective is the recovered one's. The recovery (minutes) is paid only when the
  // factorized model gains something on this worker.
  const std::string name = "factorize (90% energy)";
  const int i = Add(-1, {f}, name, "factorization");
  if (i < 0 || !trials_[i].error.empty() || !Distills() || Done()) return;
  if (trials_[i].ratio <= 1.0 + MinGain()) {
    notes_.push_back("factorization was not recovered by distillation: factorized, the model is " +
                     RatioText(trials_[i].ratio, spec_.objective) + " (trial " + std::to_string(i) + ")");
    return;
  }
  if (Passes(i)) return;  // within the goal without training
  Add(i, {Recovery(RecoveryEpochs())}, name + " + distill " + std::to_string(RecoveryEpochs()) + " ep",
      "factorization");
}

}  // namespace pare::engine::auto_search_internal
