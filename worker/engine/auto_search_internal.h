// The auto step's search (auto_search.h), shared by its two files: auto_search.cc (scoring,
// trials, checkpoints and the result) and auto_candidates.cc (the candidates each method
// family contributes: static INT8, the channel-pruning ladder and its guided variant, pruned
// models finished with INT8 or freezing, factorization). Not for other callers.
#pragma once

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "worker/engine/auto_search.h"
#include "worker/engine/channel_prune.h"
#include "worker/engine/score.h"

namespace pare::engine::auto_search_internal {

using Json = nlohmann::json;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

inline std::string Num(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// A ratio of the objective: "2.6x faster", "3.1x smaller", "2.0x fewer MACs".
inline std::string RatioText(double ratio, const std::string& objective) {
  const char* what = objective == "SIZE" ? "smaller" : objective == "MACS" ? "fewer MACs" : "faster";
  return Num("%.2fx ", ratio) + what;
}

// One candidate: steps applied to the model of another trial (or the original).
struct Trial {
  int index = 0;
  std::string name;
  std::string family;                     // "static INT8", "channel pruning + static INT8", ...
  std::string key;                        // identifies the candidate across attempts (base key + steps)
  int base = -1;                          // the trial whose model it starts from; -1: the original
  std::vector<StepSpec> steps;            // as planned (static INT8 may carry an accuracy goal)
  std::vector<std::string> float_layers;  // what accuracy control kept float
  Json recipe = Json::array();            // the plain recipe from the original that rebuilds it
  double score = 0, drop = 0, ratio = 0;
  bool meets = false;   // accuracy within the goal and the objective better than the original's
  bool frozen = false;  // quantized or frozen: nothing further applies
  bool pruned = false;
  Json stats;
  double wall_seconds = 0;
  std::vector<std::string> notes;
  std::string error;         // the candidate could not be built or measured
  bool resumed = false;      // taken from an earlier attempt's checkpoint
  double epoch_seconds = 0;  // one distillation epoch, when it distilled (later trials' epochs follow it)
  double original_p50 = 0;   // the original's batch-1 p50 timed right after this candidate's
  std::string path;          // its saved model, once built by this attempt
};

// The end of a LATENCY search, as pure rules (Search::Leaders and Search::SideBySide use them).
// The candidates the final choice is between: `chosen` first and, when it met the goal, up to three
// others within the goal whose search ratio is within 25% of its, fastest in the search first (a
// tie goes to the smaller drop), and the one with the fewest MACs among those within the goal
// finished as `chosen` is (INT8, freezing) when it has fewer than `chosen`, wherever its ratio fell,
// and likewise the one with the fewest among those with no layer kept float by accuracy control
// (in the last places if need be). Only candidates whose model is at hand (`path` set).
std::vector<int> LeadersAmong(const std::vector<Trial>& trials, const Trial& chosen);
// When no candidate meets the goal, the one the job still returns: the fastest of those within the
// accuracy goal that gained a little (under `min_gain`), for a model that keeps its accuracy is a
// basis to work from and a ruined one is not; else the least drop among those that gained more,
// else among all. Null when no candidate was built.
const Trial* ClosestAmong(const std::vector<Trial>& trials, double goal_points, double min_gain);
// Round `round`'s order of `m` models (0 is the original, k the k-th leader): the leaders then the
// original, and the exact reverse every other round, so that a drift within a round favours none.
std::vector<size_t> SideBySideOrder(size_t m, int round);
// The model picked from each one's median p50 (`median[0]` the original's, `median[1]` the
// search's choice): the fastest leader, unless the search's choice is within 3% of it.
size_t SideBySidePick(const std::vector<double>& median);

// Where the longer recoveries stand (Search::LongerRecovery): the next MACs target and its
// distillation epochs, the hardest target that passed and the gentlest that failed at the longest
// recovery (0: none yet).
struct LongerRecoveryStep {
  double target = 0;
  int epochs = 0;
  double passed = 0;
  double failed = 0;
};
// The trial after `at`, given whether it passed: a pass tries harder (x0.8, or halfway
// (geometrically) to the gentlest failure); a failure is recovered twice as long up to
// `most_epochs`, then the target halfway back to the last pass. Nothing (the end) once a pass and
// a failure are within 10% of each other, or a failure at the longest recovery has no pass above it.
std::optional<LongerRecoveryStep> NextLongerRecovery(LongerRecoveryStep at, bool passes, int most_epochs);

class Search {
 public:
  Search(const torch::jit::Module& model, const AutoSpec& spec, const AutoContext& ctx)
      : original_(model), spec_(spec), ctx_(ctx), start_(Clock::now()) {}
  // A search that stopped early (cancelled) leaves no trial files behind.
  ~Search() {
    std::error_code ec;
    for (const auto& t : trials_)
      if (!t.path.empty()) fs::remove(t.path, ec);
  }

  AutoResult Run();

 private:
  // ---- the search itself, its trials and its result (auto_search.cc) ----
  bool Allowed(const std::string& method) const;
  // Including what an earlier attempt spent on the trials this one takes from its checkpoint.
  double Elapsed() const;
  double Remaining() const { return spec_.time_budget_seconds - Elapsed(); }
  // Whether the search should stop: the budget is spent, or a candidate reached targetSpeedup.
  bool Done() const;
  bool Distills() const { return Allowed("distill") && ctx_.step->train.train != nullptr; }
  // LibTorch's INT8 kernels run on the CPU only: no candidate for a job measured on a GPU.
  bool Int8(const std::string& method);

  // The images candidates are scored on: the eval set (top-1 with labels; else top-1 agreement
  // with the original), else the calibration images, else random inputs. As many as a few seconds
  // of the original's inference allow (a search scores a model many times), or as many as an
  // earlier attempt of the job used, so that its checkpointed scores compare with this one's.
  void ChooseScorer();
  void Baseline();
  double ObjectiveValue(const Json& stats) const;

  // The best candidate within the goal, or null.
  const Trial* Best() const;

  // The search's progress line, with an estimate of how many trials the budget holds.
  void Progress(const std::string& msg);
  std::string Estimate() const;

  // The model trial `i` built (-1: the original), loaded from its file or rebuilt from its steps
  // when it came from an earlier attempt's checkpoint.
  torch::jit::Module ModelOf(int i);
  static std::vector<StepSpec> PlainSteps(const Trial& t);
  torch::jit::Module Apply(torch::jit::Module m, const std::vector<StepSpec>& steps,
                           std::vector<std::string>& notes, Trial& t);

  // The module saved and loaded back, as a job hands a step's model to the next: parameters a pass
  // derived from others (a pruned layer's) become plain leaves that train again.
  static torch::jit::Module Reloaded(torch::jit::Module& m);

  // Builds (or takes from the checkpoint) a candidate and records it; returns its index, or -1
  // when it was not run (the budget is spent).
  int Add(int base, std::vector<StepSpec> steps, const std::string& name, const std::string& family);

  // Gains below the timing noise do not count for latency.
  double MinGain() const { return spec_.objective == "LATENCY" ? 0.05 : 0.0; }

  std::string DropText(double drop) const;
  // Whether what trial `t` will train (its distillation epochs, at the timed epoch's pace, with a
  // 30% margin) fits in what is left of the budget; a trial that does not is not started (noted
  // once).
  bool Fits(const Trial& t);
  bool Resume(Trial& t);
  void Build(Trial& t);
  void Score(Trial& t) const;
  Json Record(const Trial& t) const;
  void Checkpoint() const;

  // ---- the candidates of each method family (auto_candidates.cc) ----

  // Static INT8 of `base`'s model with accuracy control: layers fall back to float, most
  // sensitive first, until the drop (with what `base` lost already) is within the goal.
  // The whole model first (one quantization, and the fastest INT8 point for the Pareto front even
  // when it loses too much); accuracy control only when it does.
  int StaticInt8(const std::string& prefix, int base);

  // Distillation from the original as the bench's hand recipes recover pruned models: Adam at
  // 0.002, batches of 128, T = 4, alpha = 0.7.
  DistillSpec Recovery(int epochs) const;

  // Kept channels in multiples of 8 (what vector kernels like) on networks wide enough for it;
  // narrow ones (a 32-channel CNN) are cut to any count, or 8 would be most of a layer.
  int RoundTo();

  // Epochs of distillation a pruned candidate gets: about a tenth of the budget each, from the
  // measured time of an epoch (one until an epoch has been timed).
  int RecoveryEpochs() const;
  // Channel pruning to `target` of the MACs, recovered by `epochs` of distillation (0: none).
  int Pruned(double target, int epochs);
  std::vector<StepSpec> PrunedSteps(double target, int epochs);
  static std::string PrunedName(double target, int epochs);

  // Channel pruning to a fraction of the MACs, each recovered by distillation when there is
  // train data: 50% first, then harder while the goal holds, or gentler until it does; once a
  // target passes and a harder one fails, the gap between them is bisected (to a 25% step).
  void PruneLadder();

  // Where uniform pruning lost too much, non-uniform: each channel group pruned as far as its
  // measured sensitivity allows (GuidedAmounts), at the gentlest target uniform pruning failed,
  // then harder while that holds.
  void GuidedPrune();

  // Each prunable group's loss (points) when pruned alone at 25, 50 and 75%, no training: the
  // analyze step's table for the original, measured once.
  bool Sensitivities();

  // Per-group amounts that keep at most `target` of the MACs: every group pruned to the largest
  // measured amount whose loss is at most a threshold, the threshold the least that reaches the
  // target (one channel analysis, many cuts). nullopt when none does.
  std::optional<std::map<std::string, double>> GuidedAmounts(double target);
  bool Passes(int i) const { return trials_[i].error.empty() && trials_[i].drop <= goal_points_; }

  // The best pruned candidates within the goal, finished with INT8 (on what accuracy they have
  // left) or frozen.
  void CombineWithPruned();
  // A pruned candidate within the goal finished with static INT8 and with freezing.
  void FinishPruned(int p);
  // With budget left once the plan is done: the gentlest pruning target that lost too much is
  // recovered for twice the epochs (then four, up to eight times), since a pruned model often
  // comes back with a longer distillation; one that passes is finished like the others and a
  // harder target tried with as long a recovery; one that fails at the longest recovery is
  // followed by the target between it and the last that passed. Until the budget is spent or the
  // targets are within 10%: only trials that fit in what is left are started.
  void LongerRecovery();
  // Low-rank factorization at 90% energy, then (with train data) recovered by distillation, but
  // only when the factorized model gains on the objective: recovery cannot change its speed.
  void Factorize();

  // Every trial not beaten on both the objective and the score.
  Json Front() const;

  // What each method family reached within the goal, for the report's "why".
  std::string Measured() const;
  AutoResult Finish();

  // Why no candidate met the goal: what came closest, and each method's best drop.
  std::string Unreachable(const Trial* closest, const std::string& goal) const;
  // LeadersAmong this search's trials (their timings were minutes apart, each beside its own
  // re-timing of the original: a 25% gap can be the machine's). A trial taken from a checkpoint
  // has no model at hand (it would be retrained) and is left out.
  std::vector<int> Leaders(const Trial& chosen) const;
  // The leaders and the original timed again at the end, in turn (three rounds in SideBySideOrder;
  // the median of each's p50s); the result is SideBySidePick's.
  Json SideBySide(const std::vector<int>& leaders);

  // Where the candidates were timed: what decides whether INT8 or pruning pays.
  std::string Host() const;
  const torch::jit::Module& original_;
  const AutoSpec& spec_;
  const AutoContext& ctx_;
  const Clock::time_point start_;
  std::unique_ptr<Scorer> scorer_;
  double base_score_ = 0, goal_points_ = 0;
  double epoch_seconds_ = 0;  // one distillation epoch, once timed
  double spent_before_ = 0;   // seconds an earlier attempt spent on the trials taken from its checkpoint
  int64_t score_images_ = 0;  // how many images candidates are scored on
  double ladder_failed_ = 0;  // the gentlest MACs target uniform pruning lost too much at
  int round_to_ = 0;          // RoundTo's answer, once found
  bool int8_noted_ = false;   // the note that INT8 was not tried (a GPU job) is written once
  bool analysed_ = false;
  bool unfit_noted_ = false;
  std::map<std::string, std::vector<std::pair<double, double>>> group_loss_;  // group -> (amount, points)
  torch::jit::Module pruner_model_;
  torch::jit::Module baseline_model_;  // the original, loaded once and timed beside each candidate
  std::unique_ptr<ChannelPruner> pruner_;
  double original_macs_ = 0;
  std::vector<Trial> trials_;  // [0] is the original
  std::vector<std::string> notes_;
};

}  // namespace pare::engine::auto_search_internal
