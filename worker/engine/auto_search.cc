#include "worker/engine/auto_search.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>

#include "worker/engine/accuracy_control.h"
#include "worker/engine/analyze.h"
#include "worker/engine/auto_search_internal.h"
#include "worker/engine/channel_prune.h"
#include "worker/engine/cpu_features.h"
#include "worker/engine/error.h"
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"
#include "worker/engine/score.h"

namespace pare::engine {

using Json = nlohmann::json;

Json RecipeStepJson(const StepSpec& step) {
  struct V {
    Json operator()(const ChannelPruneSpec& c) const {
      Json j = {{"criterion", c.criterion}, {"roundTo", c.round_to}};
      if (c.target_macs > 0)
        j["targetMacs"] = c.target_macs;
      else
        j["amount"] = c.amount;
      if (c.global) j["scope"] = "GLOBAL";
      if (!c.amounts.empty()) j["amounts"] = c.amounts;  // pruning by sensitivity: amount is the rest's
      return {{"prune", {{"channel", j}}}};
    }
    Json operator()(const DistillSpec& d) const {
      return {{"distill",
               {{"epochs", d.train.epochs},
                {"learningRate", d.train.learning_rate},
                {"batchSize", d.train.batch_size},
                {"optimizer", d.train.optimizer},
                {"temperature", d.temperature},
                {"alpha", d.alpha}}}};
    }
    Json operator()(const StaticQuantSpec& q) const {
      Json j = {
          {"observer", q.observer}, {"calibrationBatches", q.calibration_batches}, {"target", q.target}};
      if (!q.exclude.empty()) j["exclude"] = q.exclude;
      if (q.max_accuracy_drop) j["maxAccuracyDrop"] = *q.max_accuracy_drop;
      return {{"quantize", {{"static", j}}}};
    }
    Json operator()(const DynamicQuantSpec&) const { return {{"quantize", {{"dynamic", Json::object()}}}}; }
    Json operator()(const OptimizeSpec&) const { return {{"optimize", Json::object()}}; }
    Json operator()(const FactorizeSpec& f) const {
      return {{"factorize", f.energy > 0 ? Json{{"energy", f.energy}} : Json{{"rankRatio", f.rank_ratio}}}};
    }
    Json operator()(const MagnitudePruneSpec&) const { return {{"unsupported", "prune.magnitude"}}; }
    Json operator()(const NMPruneSpec&) const { return {{"unsupported", "prune.nm"}}; }
    Json operator()(const HalfPrecisionSpec&) const { return {{"unsupported", "quantize.fp16"}}; }
    Json operator()(const FinetuneSpec&) const { return {{"unsupported", "finetune"}}; }
    Json operator()(const AnalyzeSpec&) const { return {{"unsupported", "analyze"}}; }
    Json operator()(const AutoSpec&) const { return {{"unsupported", "auto"}}; }
  };
  return std::visit(V{}, step);
}

namespace auto_search_internal {

AutoResult Search::Run() {
  ChooseScorer();
  Baseline();
  // INT8 and freezing keep the float model's arithmetic: no candidates when MACs are the objective.
  const bool arithmetic = spec_.objective == "MACS";
  if (arithmetic) notes_.push_back("objective MACS: INT8 and freezing keep the MACs, so they were not tried");
  if (!arithmetic && Int8("quantize.static")) StaticInt8({}, -1);
  if (!arithmetic && Allowed("optimize")) Add(-1, {OptimizeSpec{}}, "optimize (frozen)", "freezing");
  if (!arithmetic && Int8("quantize.dynamic") && !Done())
    Add(-1, {DynamicQuantSpec{}}, "dynamic INT8", "dynamic INT8");
  if (Allowed("prune.channel")) {
    PruneLadder();
    GuidedPrune();
  }
  if (!arithmetic) CombineWithPruned();
  if (Allowed("factorize") && !Done()) Factorize();
  if (Allowed("prune.channel")) LongerRecovery();
  return Finish();
}

bool Search::Allowed(const std::string& method) const {
  return spec_.methods.empty() ||
         std::find(spec_.methods.begin(), spec_.methods.end(), method) != spec_.methods.end();
}

double Search::Elapsed() const {
  return spent_before_ + std::chrono::duration<double>(Clock::now() - start_).count();
}

bool Search::Done() const {
  if (Remaining() <= 0) return true;
  const Trial* best = Best();
  return spec_.target_speedup > 0 && best && best->ratio >= spec_.target_speedup;
}

bool Search::Int8(const std::string& method) {
  if (!Allowed(method)) return false;
  if (!ctx_.measure->device.is_cuda()) return true;
  if (!int8_noted_)
    notes_.push_back("no INT8 candidates: LibTorch's INT8 kernels run on the CPU, this job on a GPU");
  int8_noted_ = true;
  return false;
}

void Search::ChooseScorer() {
  const StepContext& sc = *ctx_.step;
  const Dataset* eval = ctx_.eval;
  const Dataset* source = eval ? eval : sc.calibration;
  const bool labelled = eval && eval->labels.defined();
  const c10::Device device = ctx_.measure->device;
  torch::jit::Module m = original_;
  m.to(device);
  int64_t want = 0;
  for (const auto& r : ctx_.resume)
    if (r.is_object() && r.value("score_images", int64_t(0)) > 0) want = r["score_images"].get<int64_t>();
  if (want <= 0) {
    at::Tensor probe =
        ctx_.measure->samples.slice(0, 0, std::min<int64_t>(16, ctx_.measure->samples.size(0)));
    std::vector<at::Tensor> probe_more;
    for (const auto& t : ctx_.measure->more_samples) probe_more.push_back(t.slice(0, 0, probe.size(0)));
    RunBatched(m, probe, device, 16, nullptr, probe_more);  // the first run also optimises the graph
    const auto t0 = Clock::now();
    RunBatched(m, probe, device, 16, nullptr, probe_more);
    const double per_image =
        std::max(1e-6, std::chrono::duration<double>(Clock::now() - t0).count() / double(probe.size(0)));
    want = labelled ? std::clamp<int64_t>(int64_t(6.0 / per_image), 500, 10000)
                    : std::clamp<int64_t>(int64_t(3.0 / per_image), 64, 2000);
  }
  at::Tensor samples;
  std::vector<at::Tensor> more;
  if (source && !labelled) {
    const int64_t n = std::min<int64_t>(want, source->images.size(0));
    samples = source->images.slice(0, 0, n);
    for (const at::Tensor& t : source->more_images) more.push_back(t.slice(0, 0, n));
  } else if (!labelled) {
    std::vector<int64_t> shape = sc.input_shape;
    shape[0] = want;
    at::Generator gen = at::detail::createCPUGenerator(sc.seed + 29);
    samples = at::randn(shape, gen);
    more = RandomInputs(sc.more_inputs, want, c10::kCPU, gen);
  }
  // What the candidates are really scored on (the report's figure, and what a resumed search
  // asks for again): the budget's count, or fewer where the data has fewer.
  if (samples.defined()) {
    want = samples.size(0);
  } else if (eval) {
    want = std::min<int64_t>(want, eval->images.size(0));
  }
  score_images_ = want;
  const std::string what = labelled ? ""
                           : eval   ? "eval images (no labels)"
                           : source ? "calibration images"
                                    : "random inputs (no eval or calibration images)";
  ScoreOptions options;
  options.max_eval_images = want;
  options.top1_agreement = true;
  options.device = device;
  options.samples = what;
  scorer_ = std::make_unique<Scorer>(m, labelled ? eval : nullptr, samples, more, options);
}

void Search::Baseline() {
  torch::jit::Module m = original_;
  base_score_ = scorer_->Score(m);
  goal_points_ = spec_.relative ? spec_.max_accuracy_drop * base_score_ : spec_.max_accuracy_drop;
  Trial t;
  t.index = 0;
  t.name = "original";
  t.family = "original";
  t.key = "original";
  t.score = base_score_;
  t.ratio = 1.0;
  // Timed again beside the candidates (the job's figure may come from its latency cache), and
  // as they are: freshly loaded.
  MeasureContext mc = *ctx_.measure;
  mc.latency_batches = {1};
  mc.eval = nullptr;
  baseline_model_ = LoadModel(ctx_.step->input_path);
  ModelStats stats = Measure(baseline_model_, ctx_.step->input_path, mc);
  if (scorer_->labelled()) stats.top1_accuracy = base_score_;
  if (!stats.macs) stats.macs = ctx_.original->macs;
  t.stats = ToJson(stats);
  trials_.push_back(t);
}

double Search::ObjectiveValue(const Json& stats) const {
  if (spec_.objective == "SIZE") return stats.value("size_bytes", 0.0);
  if (spec_.objective == "MACS") return stats["macs"].is_number() ? stats["macs"].get<double>() : 0.0;
  for (const auto& l : stats.value("latency", Json::array()))
    if (l.value("batch", 0) == 1) return l.value("p50_ms", 0.0);
  return 0.0;
}

const Trial* Search::Best() const {
  const Trial* best = nullptr;
  for (const auto& t : trials_) {
    if (t.meets && (!best || t.ratio > best->ratio || (t.ratio == best->ratio && t.drop < best->drop)))
      best = &t;
  }
  return best;
}

void Search::Progress(const std::string& msg) {
  if (!ctx_.step->train.progress) return;
  ctx_.step->train.progress(std::min(0.99, Elapsed() / spec_.time_budget_seconds), msg);
}

std::string Search::Estimate() const {
  const int done = int(trials_.size()) - 1;
  if (done <= 0) return "";
  const double per = Elapsed() / done;
  return " (~" + std::to_string(done + int(std::max(0.0, Remaining()) / std::max(per, 1e-3))) + " in budget)";
}

torch::jit::Module Search::ModelOf(int i) {
  // Loaded afresh: a copy would share its class types with the original, which an in-place
  // pass (dynamic INT8) changes.
  if (i < 0) return LoadModel(ctx_.step->input_path);
  Trial& t = trials_[i];
  if (t.path.empty()) {
    Progress("rebuilding trial " + std::to_string(t.index) + " (" + t.name + ") from its recipe");
    torch::jit::Module m = ModelOf(t.base);
    std::vector<std::string> ignored;
    const double epoch = epoch_seconds_, trial_epoch = t.epoch_seconds;  // the plan stays as it was
    m = Apply(m, PlainSteps(t), ignored, t);
    epoch_seconds_ = epoch;
    t.epoch_seconds = trial_epoch;
    t.path = ctx_.work_prefix + ".trial" + std::to_string(t.index);
    m.save(t.path);
    notes_.push_back("trial " + std::to_string(t.index) + " (" + t.name +
                     ") was taken from the checkpoint and rebuilt from its recipe");
  }
  return LoadModel(t.path);
}

std::vector<StepSpec> Search::PlainSteps(const Trial& t) {
  std::vector<StepSpec> out = t.steps;
  for (auto& s : out) {
    if (auto* q = std::get_if<StaticQuantSpec>(&s)) {
      q->exclude.insert(q->exclude.end(), t.float_layers.begin(), t.float_layers.end());
      q->max_accuracy_drop.reset();
    }
  }
  return out;
}

torch::jit::Module Search::Apply(torch::jit::Module m, const std::vector<StepSpec>& steps,
                                 std::vector<std::string>& notes, Trial& t) {
  StepContext sc = *ctx_.step;
  const std::string label = "trial " + std::to_string(t.index) + ": " + t.name;
  sc.train.progress = [this, label](double within, const std::string& msg) {
    Progress(label + ": " + msg + Num(" (%.0f%%)", 100 * within));
  };
  for (size_t i = 0; i < steps.size(); ++i) {
    const StepSpec& step = steps[i];
    if (i > 0) m = Reloaded(m);
    if (const auto* q = std::get_if<StaticQuantSpec>(&step); q && q->max_accuracy_drop) {
      std::vector<std::vector<at::Tensor>> more;
      auto batches = CalibrationBatches(sc, q->calibration_batches, notes, more);
      m.to(c10::kCPU);
      // Accuracy control measures a quantization per layer: at most 40% of the budget, and
      // never past its end.
      const double until = std::min(Elapsed() + 0.4 * spec_.time_budget_seconds, spec_.time_budget_seconds);
      m = QuantizeWithAccuracyControl(m, *q, batches, more, *scorer_, notes, sc.train.progress,
                                      &t.float_layers, [this, until] { return Elapsed() > until; });
      // Every layer kept float leaves a float model under an INT8 name: not a candidate (its
      // timing would be the float model's, give or take noise).
      if (!IsQuantized(m))
        throw EngineError(Code::kFailedPrecondition, "UNCHANGED",
                          "accuracy control kept every layer float: nothing is left in INT8");
      continue;
    }
    const auto t0 = Clock::now();
    bool unchanged = false;
    m = ApplyStep(m, step, sc, notes, unchanged);
    if (unchanged)
      throw EngineError(Code::kFailedPrecondition, "UNCHANGED", StepName(step) + " changed nothing");
    if (const auto* d = std::get_if<DistillSpec>(&step)) {
      epoch_seconds_ = std::chrono::duration<double>(Clock::now() - t0).count() / d->train.epochs;
      t.epoch_seconds = epoch_seconds_;
    }
  }
  return m;
}

torch::jit::Module Search::Reloaded(torch::jit::Module& m) {
  std::stringstream buf;
  m.save(buf);
  torch::jit::Module out = torch::jit::load(buf, c10::Device(c10::kCPU));
  out.eval();
  return out;
}

int Search::Add(int base, std::vector<StepSpec> steps, const std::string& name, const std::string& family) {
  if (Remaining() <= 0) return -1;
  Trial t;
  t.index = int(trials_.size());
  t.name = name;
  t.family = family;
  t.base = base;
  t.steps = std::move(steps);
  Json key = {{"base", base < 0 ? Json("original") : Json(trials_[base].key)}, {"steps", Json::array()}};
  for (const auto& s : t.steps) key["steps"].push_back(RecipeStepJson(s));
  t.key = key.dump();
  for (const auto& s : t.steps) {
    t.frozen = t.frozen || std::holds_alternative<StaticQuantSpec>(s) ||
               std::holds_alternative<DynamicQuantSpec>(s) || std::holds_alternative<OptimizeSpec>(s);
    t.pruned = t.pruned || std::holds_alternative<ChannelPruneSpec>(s);
  }
  if (base >= 0) t.pruned = t.pruned || trials_[base].pruned;
  if (!Resume(t)) {
    if (!Fits(t)) return -1;
    Build(t);
  }
  t.meets = t.error.empty() && t.drop <= goal_points_ + 1e-9 && t.ratio > 1.0 + MinGain();
  trials_.push_back(t);
  Checkpoint();
  const Trial* best = Best();
  std::string line = "trial " + std::to_string(t.index) + Estimate() + ": " + t.name;
  if (!t.error.empty()) {
    line += " failed: " + t.error;
  } else {
    line += " - " + DropText(t.drop) + ", " + RatioText(t.ratio, spec_.objective) +
            (t.meets                 ? ""
             : t.drop > goal_points_ ? " (over the accuracy goal)"
                                     : " (no gain)");
  }
  line += best ? "; best so far " + RatioText(best->ratio, spec_.objective) : "; none within the goal yet";
  Progress(line);
  return t.index;
}

bool Search::Fits(const Trial& t) {
  int epochs = 0;
  for (const auto& s : t.steps)
    if (const auto* d = std::get_if<DistillSpec>(&s)) epochs += d->train.epochs;
  // With a margin for pruning, scoring and timing the candidate.
  const double needs = 1.3 * epochs * epoch_seconds_;
  if (needs <= Remaining()) return true;
  if (!unfit_noted_) {
    notes_.push_back("a trial was not started: its " + std::to_string(epochs) +
                     " distillation epoch(s) take about " + Num("%.0f s", needs) + " and " +
                     Num("%.0f s", std::max(0.0, Remaining())) + " of the budget were left (" + t.name + ")");
    unfit_noted_ = true;
  }
  return false;
}

std::string Search::DropText(double drop) const {
  const std::string& measure = scorer_->measure();
  return std::string(scorer_->labelled()            ? "top-1 "
                     : measure == "top-1 agreement" ? "agreement "
                                                    : "cosine ") +
         (drop > 0 ? "-" : "+") + Num("%.2f", std::abs(drop));
}

bool Search::Resume(Trial& t) {
  for (const auto& r : ctx_.resume) {
    if (!r.is_object() || r.value("key", "") != t.key) continue;
    t.resumed = true;
    t.score = r.value("score", 0.0);
    t.stats = r.value("stats", Json());
    t.wall_seconds = r.value("wall_seconds", 0.0);
    t.notes = r.value("notes", std::vector<std::string>{});
    t.error = r.value("error", "");
    t.float_layers = r.value("float_layers", std::vector<std::string>{});
    t.name = r.value("name", t.name);
    t.epoch_seconds = r.value("epoch_seconds", 0.0);
    t.original_p50 = r.value("original_p50_ms", 0.0);
    if (t.epoch_seconds > 0) epoch_seconds_ = t.epoch_seconds;  // the plan goes on as it went
    spent_before_ += t.wall_seconds;
    Score(t);
    return true;
  }
  return false;
}

void Search::Build(Trial& t) {
  const auto t0 = Clock::now();
  Progress("trial " + std::to_string(t.index) + Estimate() + ": " + t.name);
  try {
    torch::jit::Module m = ModelOf(t.base);
    m = Apply(m, t.steps, t.notes, t);
    m.to(c10::kCPU);
    t.path = ctx_.work_prefix + ".trial" + std::to_string(t.index);
    m.save(t.path);
    // Timed as the job times a step's model: freshly loaded, before anything else runs it (a
    // large batch first leaves TorchScript's executor specialised for it, and batch 1 slower).
    m = LoadModel(t.path);  // what the user would get must load on its own
    MeasureContext mc = *ctx_.measure;
    mc.latency_batches = {1};
    mc.eval = nullptr;  // scored below, on the search's own images
    ModelStats stats = Measure(m, t.path, mc);
    // The original timed again right after, side by side: the ratio holds on a machine whose
    // load changes during a long search.
    if (spec_.objective == "LATENCY") t.original_p50 = TimeLatency(baseline_model_, mc, 1).p50_ms;
    torch::jit::Module scored = LoadModel(t.path);
    t.score = scorer_->Score(scored);
    if (!stats.macs) {  // frozen graphs are not counted: their arithmetic is what they came from
      const Json& from = t.base < 0 ? trials_[0].stats : trials_[t.base].stats;
      if (from["macs"].is_number()) stats.macs = from["macs"].get<double>();
    }
    if (scorer_->labelled()) stats.top1_accuracy = t.score;
    t.stats = ToJson(stats);
  } catch (const Cancelled&) {
    throw;
  } catch (const std::exception& e) {
    t.error = ErrorText(e);
    if (!t.path.empty()) fs::remove(t.path);
    t.path.clear();
  }
  t.wall_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  Score(t);
  if (t.float_layers.size()) t.name += " (" + std::to_string(t.float_layers.size()) + " layer(s) float)";
}

void Search::Score(Trial& t) const {
  t.drop = (base_score_ - t.score) * 100.0;
  double before = ObjectiveValue(trials_[0].stats);
  if (spec_.objective == "LATENCY" && t.original_p50 > 0) before = t.original_p50;
  const double after = t.stats.is_object() ? ObjectiveValue(t.stats) : 0;
  t.ratio = t.error.empty() && after > 0 ? before / after : 0.0;
  t.recipe = Json::array();
  if (t.base >= 0) t.recipe = trials_[t.base].recipe;
  for (const auto& s : PlainSteps(t)) t.recipe.push_back(RecipeStepJson(s));
}

Json Search::Record(const Trial& t) const {
  Json j = {{"index", t.index},
            {"name", t.name},
            {"family", t.family},
            {"key", t.key},
            {"base", t.base},
            {"recipe", {{"steps", t.recipe}}},
            {"score", t.score},
            {"drop", t.drop},
            {"ratio", t.ratio},
            {"meets_goal", t.meets},
            {"wall_seconds", t.wall_seconds},
            {"notes", t.notes},
            {"resumed", t.resumed}};
  if (t.stats.is_object()) j["stats"] = t.stats;  // a failed trial has none
  if (!t.error.empty()) j["error"] = t.error;
  if (!t.float_layers.empty()) j["float_layers"] = t.float_layers;
  if (t.epoch_seconds > 0) j["epoch_seconds"] = t.epoch_seconds;
  if (t.original_p50 > 0) j["original_p50_ms"] = t.original_p50;
  j["score_images"] = score_images_;
  return j;
}

void Search::Checkpoint() const {
  if (!ctx_.checkpoint) return;
  Json all = Json::array();
  for (size_t i = 1; i < trials_.size(); ++i) all.push_back(Record(trials_[i]));
  ctx_.checkpoint(all);
}

Json Search::Front() const {
  Json front = Json::array();
  for (const auto& t : trials_) {
    if (!t.error.empty()) continue;
    const bool dominated = std::any_of(trials_.begin(), trials_.end(), [&](const Trial& o) {
      return o.error.empty() && o.ratio >= t.ratio && o.score >= t.score &&
             (o.ratio > t.ratio || o.score > t.score);
    });
    if (!dominated) front.push_back(t.index);
  }
  return front;
}

std::string Search::Measured() const {
  std::map<std::string, double> best;
  for (const auto& t : trials_) {
    if (t.index == 0 || !t.error.empty() || t.drop > goal_points_) continue;
    best[t.family] = std::max(best[t.family], t.ratio);  // below 1: slower than the original
  }
  std::string out;
  for (const auto& [family, ratio] : best)
    out += (out.empty() ? "" : ", ") + family + " " + Num("%.2fx", ratio);
  return out.empty() ? "nothing within the goal" : out;
}

AutoResult Search::Finish() {
  AutoResult r;
  const Trial* best = Best();
  const Trial* chosen = best;
  if (!chosen) chosen = ClosestAmong(trials_, goal_points_, MinGain());
  const std::string metric = scorer_->metric();
  const std::string host = Host();
  Json search = {{"goal",
                  {{"max_accuracy_drop", spec_.max_accuracy_drop},
                   {"relative", spec_.relative},
                   {"points", goal_points_},
                   {"objective", spec_.objective},
                   {"target_speedup", spec_.target_speedup},
                   {"time_budget_seconds", spec_.time_budget_seconds}}},
                 {"metric", metric},
                 {"baseline_score", base_score_},
                 {"elapsed_seconds", Elapsed()},
                 {"host", host}};
  Json trials = Json::array();
  for (const auto& t : trials_) trials.push_back(Record(t));
  search["trials"] = trials;
  search["front"] = Front();
  int resumed = 0;
  for (const auto& t : trials_) resumed += t.resumed ? 1 : 0;
  search["resumed_trials"] = resumed;
  const std::string measured = "measured on " + host + ", within the accuracy goal (a gain counts above " +
                               Num("%.2fx", 1.0 + MinGain()) + "): " + Measured();
  std::string chose_side_by_side;  // why the re-timing at the end changed the search's choice
  if (chosen && spec_.objective == "LATENCY") {
    try {
      search["side_by_side"] = SideBySide(Leaders(*chosen));
      const Json& s = search["side_by_side"];
      std::string each;
      for (const auto& c : s["candidates"]) {
        each += "; trial " + std::to_string(c["trial"].get<int>()) + " " +
                Num("%.3g ms", c["p50_ms"].get<double>()) + " (" +
                RatioText(c["ratio"].get<double>(), spec_.objective) + ", in the search " +
                Num("%.2fx", c["search_ratio"].get<double>()) + ")";
      }
      r.notes.push_back("auto: timed again side by side at the end (" +
                        std::to_string(s["rounds"].get<int>()) + " rounds in turn): original " +
                        Num("%.3g", s["original_p50_ms"].get<double>()) + " ms at batch 1" + each);
      const int picked = s["chosen"].get<int>();
      if (picked != chosen->index) {
        chose_side_by_side = "trial " + std::to_string(picked) + " (" + trials_[picked].name +
                             "): the fastest side by side at the end (" +
                             RatioText(s["ratio"].get<double>(), spec_.objective) + ", " +
                             DropText(trials_[picked].drop) + "), where the search had trial " +
                             std::to_string(chosen->index) + " (" +
                             RatioText(chosen->ratio, spec_.objective) + ") ahead of its " +
                             Num("%.2fx", trials_[picked].ratio);
        chosen = &trials_[picked];
      }
    } catch (const Cancelled&) {
      throw;
    } catch (const std::exception& e) {
      // The search's own figures stand; the job does not fail over a re-timing.
      r.notes.push_back(std::string("auto: the side-by-side timing at the end failed: ") + e.what());
    }
  }
  if (chosen) {
    r.module = ModelOf(chosen->index);
    search["chosen"] = chosen->index;
    search["recipe"] = {{"steps", chosen->recipe}};
  } else {
    r.module = original_;
  }
  const std::string goal = Num("%.3g", goal_points_) + " points of " + metric;
  if (best) {
    search["why"] = (chose_side_by_side.empty()
                         ? "trial " + std::to_string(best->index) + " (" + best->name +
                               "): it has the best " + spec_.objective + " ratio within the goal (" +
                               RatioText(best->ratio, spec_.objective) + ", " + DropText(best->drop) + ")"
                         : chose_side_by_side) +
                    "; " + measured;
    r.notes.push_back("auto: chose " + search["why"].get<std::string>());
  } else {
    r.unreachable = Unreachable(chosen, goal);
    search["why"] = r.unreachable + "; " + measured;
  }
  r.notes.push_back(
      "auto: " + std::to_string(trials_.size() - 1) + " trial(s) in " + Num("%.0f s", Elapsed()) + " of a " +
      Num("%.0f s", spec_.time_budget_seconds) + " budget" +
      (resumed ? ", " + std::to_string(resumed) + " taken from an earlier attempt's checkpoint" : "") +
      "; accuracy is " + metric + " (original " + Num("%.2f", base_score_ * 100) + ")");
  if (!scorer_->labelled())
    r.notes.push_back("auto: no labelled eval set, so the drop is in points of " + scorer_->measure() +
                      " with the original, not accuracy");
  if (!scorer_->caveat().empty()) r.notes.push_back("auto: " + scorer_->caveat());
  r.notes.insert(r.notes.end(), notes_.begin(), notes_.end());
  if (chosen)
    r.notes.push_back("auto: the plain recipe that rebuilds the result: " + search["recipe"].dump());
  for (const auto& t : trials_)
    if (!t.path.empty() && (!chosen || t.index != chosen->index)) fs::remove(t.path);
  if (chosen && !chosen->path.empty()) fs::remove(chosen->path);
  r.search = search;
  return r;
}

std::vector<int> LeadersAmong(const std::vector<Trial>& trials, const Trial& chosen) {
  constexpr double kWindow = 1.25;
  constexpr size_t kMost = 4;
  std::vector<int> out = {chosen.index};
  if (!chosen.meets) return out;
  std::vector<const Trial*> others;
  for (const auto& t : trials) {
    if (t.index != chosen.index && t.meets && !t.path.empty() && t.ratio * kWindow >= chosen.ratio)
      others.push_back(&t);
  }
  std::stable_sort(others.begin(), others.end(), [](const Trial* a, const Trial* b) {
    return a->ratio > b->ratio || (a->ratio == b->ratio && a->drop < b->drop);
  });
  for (const Trial* t : others) {
    if (out.size() >= kMost) break;
    out.push_back(t->index);
  }
  // The candidate with the fewest MACs among those within the goal finished as the choice is (the
  // last step of its family: "static INT8", "freezing"), wherever its search ratio fell: on a model
  // of a fraction of a millisecond one timing's noise can hide the most pruned one, and the
  // rounds side by side decide. And the leanest of those with no layer kept float by accuracy
  // control, where that is another: layers kept float can cost more than the MACs pruned save
  // (SmallResNet: 32% of the MACs with INT8 around float layers ran slower than 40% in whole-model
  // INT8). They take the last places when the others fill them.
  auto finish = [](const std::string& family) {
    const size_t plus = family.rfind(" + ");
    return plus == std::string::npos ? family : family.substr(plus + 3);
  };
  auto macs = [](const Trial& t) {
    return t.stats.is_object() && t.stats.contains("macs") && t.stats["macs"].is_number()
               ? t.stats["macs"].get<double>()
               : -1.0;
  };
  auto leanest = [&](bool whole_only) {
    const Trial* found = nullptr;
    for (const auto& t : trials) {
      if (!t.meets || t.path.empty() || macs(t) <= 0 || finish(t.family) != finish(chosen.family)) continue;
      if (whole_only && !t.float_layers.empty()) continue;
      if (!found || macs(t) < macs(*found)) found = &t;
    }
    return found;
  };
  std::vector<const Trial*> lean;
  for (const Trial* t : {leanest(false), leanest(true)}) {
    if (t && std::find(out.begin(), out.end(), t->index) == out.end() &&
        (macs(chosen) <= 0 || macs(*t) < macs(chosen)) &&
        std::find(lean.begin(), lean.end(), t) == lean.end())
      lean.push_back(t);
  }
  while (!lean.empty() && out.size() + lean.size() > kMost && out.size() > 1) out.pop_back();
  for (const Trial* t : lean) out.push_back(t->index);
  return out;
}

std::optional<LongerRecoveryStep> NextLongerRecovery(LongerRecoveryStep s, bool passes, int most_epochs) {
  const double close = 1.1;
  if (passes) {
    s.passed = s.target;
    if (s.failed <= 0) {
      s.target *= 0.8;
      return s;
    }
    if (s.passed / s.failed < close) return std::nullopt;
    s.target = std::sqrt(s.passed * s.failed);
    return s;
  }
  if (s.epochs < most_epochs) {
    s.epochs = std::min(2 * s.epochs, most_epochs);
    return s;
  }
  s.failed = std::max(s.failed, s.target);
  if (s.passed <= 0 || s.passed / s.failed < close) return std::nullopt;
  s.target = std::sqrt(s.passed * s.failed);
  return s;
}

std::vector<size_t> SideBySideOrder(size_t m, int round) {
  std::vector<size_t> order;
  for (size_t n = 0; n < m; ++n) order.push_back(round % 2 == 0 ? (n + 1) % m : (m - n) % m);
  return order;
}

const Trial* ClosestAmong(const std::vector<Trial>& trials, double goal_points, double min_gain) {
  auto usable = [](const Trial& t) { return t.index > 0 && t.error.empty(); };
  const Trial* closest = nullptr;
  for (const auto& t : trials)
    if (usable(t) && t.drop <= goal_points + 1e-9 && t.ratio > 1.0 && (!closest || t.ratio > closest->ratio))
      closest = &t;
  for (const bool gained : {true, false}) {
    if (closest) break;
    for (const auto& t : trials) {
      if (!usable(t) || (gained && t.ratio <= 1.0 + min_gain)) continue;
      if (!closest || t.drop < closest->drop || (t.drop == closest->drop && t.ratio > closest->ratio))
        closest = &t;
    }
  }
  return closest;
}

size_t SideBySidePick(const std::vector<double>& median) {
  size_t fastest = 1;
  for (size_t k = 2; k < median.size(); ++k)
    if (median[k] < median[fastest]) fastest = k;
  return median[1] <= 1.03 * median[fastest] ? 1 : fastest;
}

std::vector<int> Search::Leaders(const Trial& chosen) const { return LeadersAmong(trials_, chosen); }

Json Search::SideBySide(const std::vector<int>& leaders) {
  MeasureContext mc = *ctx_.measure;
  mc.latency_batches = {1};
  // models[0] is the original; models[k] is leaders[k - 1].
  std::vector<torch::jit::Module> models = {baseline_model_};
  for (int i : leaders) models.push_back(ModelOf(i));
  constexpr int kRounds = 3;
  const size_t m = models.size();
  std::vector<std::vector<double>> ms(m);
  Json order = Json::array();  // each round's order, as trial indices (the original is trial 0)
  for (int round = 0; round < kRounds; ++round) {
    order.push_back(Json::array());
    for (size_t k : SideBySideOrder(m, round)) {
      ms[k].push_back(TimeLatency(models[k], mc, 1).p50_ms);
      order.back().push_back(k == 0 ? 0 : leaders[k - 1]);
    }
  }
  std::vector<double> median;
  for (const auto& v : ms) median.push_back(Percentile(v, 0.5));
  const size_t pick = SideBySidePick(median);
  const double o = median[0];
  Json candidates = Json::array();
  for (size_t k = 1; k < m; ++k) {
    const Trial& t = trials_[leaders[k - 1]];
    candidates.push_back({{"trial", t.index},
                          {"name", t.name},
                          {"p50_ms", median[k]},
                          {"ratio", median[k] > 0 ? o / median[k] : 0.0},
                          {"search_ratio", t.ratio}});
  }
  return {{"original_p50_ms", o},
          {"result_p50_ms", median[pick]},
          {"ratio", median[pick] > 0 ? o / median[pick] : 0.0},
          {"rounds", kRounds},
          {"chosen", leaders[pick - 1]},
          {"candidates", candidates},
          {"order", order}};
}

std::string Search::Unreachable(const Trial* closest, const std::string& goal) const {
  bool accurate = false;  // some candidate kept the accuracy, but none gained
  for (const auto& t : trials_)
    accurate = accurate || (t.index > 0 && t.error.empty() && t.drop <= goal_points_);
  std::string why = accurate ? "no candidate within the accuracy goal (at most " + goal +
                                   " lost) improved the " + spec_.objective + " on this worker"
                             : "no candidate met the accuracy goal (at most " + goal + " lost)";
  if (!closest)
    return why +
           ": no candidate was built (the notes say why: methods that cannot change this objective, "
           "or the time budget)";
  why += "; the closest is trial " + std::to_string(closest->index) + " (" + closest->name +
         "): " + DropText(closest->drop) + ", " + RatioText(closest->ratio, spec_.objective);
  for (const auto& t : trials_) {
    if (!t.error.empty() || t.index == 0) continue;
    for (const auto& n : t.notes) {
      if (n.find("WARNING: accuracy control") != std::string::npos)
        why += "; " + t.name + ": even with layers kept float the drop stays " + Num("%.2f", t.drop);
    }
  }
  bool any_faster = false;
  for (const auto& t : trials_)
    any_faster = any_faster || (t.index > 0 && t.error.empty() && t.ratio > 1.0 + MinGain());
  if (!any_faster) why += "; no candidate improved the objective on this worker";
  return why;
}

std::string Search::Host() const {
  if (ctx_.measure->device.is_cuda()) return "the GPU (" + ctx_.measure->device.str() + ")";
  const CpuFeatures& cpu = HostCpu();
  return (cpu.model.empty() ? std::string("this CPU") : cpu.model) + " (" + cpu.Extensions() +
         (cpu.FastInt8() ? "; int8 products summed in 32 bits: fast INT8)"
                         : "; no AVX-512 VNNI or AMX: INT8 gains little)");
}

}  // namespace auto_search_internal

AutoResult AutoSearch(const torch::jit::Module& model, const AutoSpec& spec, const AutoContext& ctx) {
  return auto_search_internal::Search(model, spec, ctx).Run();
}

}  // namespace pare::engine
