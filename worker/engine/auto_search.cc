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
      if (q.max_accuracy_drop > 0) j["maxAccuracyDrop"] = q.max_accuracy_drop;
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

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string Num(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// A ratio of the objective: "2.6x faster", "3.1x smaller", "2.0x fewer MACs".
std::string RatioText(double ratio, const std::string& objective) {
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

  AutoResult Run() {
    ChooseScorer();
    Baseline();
    // INT8 and freezing keep the float model's arithmetic: no candidates when MACs are the objective.
    const bool arithmetic = spec_.objective == "MACS";
    if (arithmetic)
      notes_.push_back("objective MACS: INT8 and freezing keep the MACs, so they were not tried");
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
    return Finish();
  }

 private:
  bool Allowed(const std::string& method) const {
    return spec_.methods.empty() ||
           std::find(spec_.methods.begin(), spec_.methods.end(), method) != spec_.methods.end();
  }
  // Including what an earlier attempt spent on the trials this one takes from its checkpoint.
  double Elapsed() const {
    return spent_before_ + std::chrono::duration<double>(Clock::now() - start_).count();
  }
  double Remaining() const { return spec_.time_budget_seconds - Elapsed(); }
  // Whether the search should stop: the budget is spent, or a candidate reached targetSpeedup.
  bool Done() const {
    if (Remaining() <= 0) return true;
    const Trial* best = Best();
    return spec_.target_speedup > 0 && best && best->ratio >= spec_.target_speedup;
  }
  bool Distills() const { return Allowed("distill") && ctx_.step->train.train != nullptr; }
  // LibTorch's INT8 kernels run on the CPU only: no candidate for a job measured on a GPU.
  bool Int8(const std::string& method) {
    if (!Allowed(method)) return false;
    if (!ctx_.measure->device.is_cuda()) return true;
    if (!int8_noted_)
      notes_.push_back("no INT8 candidates: LibTorch's INT8 kernels run on the CPU, this job on a GPU");
    int8_noted_ = true;
    return false;
  }

  // The images candidates are scored on: the eval set (top-1 with labels; else top-1 agreement
  // with the original), else the calibration images, else random inputs. As many as a few seconds
  // of the original's inference allow (a search scores a model many times), or as many as an
  // earlier attempt of the job used, so that its checkpointed scores compare with this one's.
  void ChooseScorer() {
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

  void Baseline() {
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

  double ObjectiveValue(const Json& stats) const {
    if (spec_.objective == "SIZE") return stats.value("size_bytes", 0.0);
    if (spec_.objective == "MACS") return stats["macs"].is_number() ? stats["macs"].get<double>() : 0.0;
    for (const auto& l : stats.value("latency", Json::array()))
      if (l.value("batch", 0) == 1) return l.value("p50_ms", 0.0);
    return 0.0;
  }

  // The best candidate within the goal, or null.
  const Trial* Best() const {
    const Trial* best = nullptr;
    for (const auto& t : trials_) {
      if (t.meets && (!best || t.ratio > best->ratio || (t.ratio == best->ratio && t.drop < best->drop)))
        best = &t;
    }
    return best;
  }

  // The search's progress line, with an estimate of how many trials the budget holds.
  void Progress(const std::string& msg) {
    if (!ctx_.step->train.progress) return;
    ctx_.step->train.progress(std::min(0.99, Elapsed() / spec_.time_budget_seconds), msg);
  }

  std::string Estimate() const {
    const int done = int(trials_.size()) - 1;
    if (done <= 0) return "";
    const double per = Elapsed() / done;
    return " (~" + std::to_string(done + int(std::max(0.0, Remaining()) / std::max(per, 1e-3))) +
           " in budget)";
  }

  // The model trial `i` built (-1: the original), loaded from its file or rebuilt from its steps
  // when it came from an earlier attempt's checkpoint.
  torch::jit::Module ModelOf(int i) {
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

  static std::vector<StepSpec> PlainSteps(const Trial& t) {
    std::vector<StepSpec> out = t.steps;
    for (auto& s : out) {
      if (auto* q = std::get_if<StaticQuantSpec>(&s)) {
        q->exclude.insert(q->exclude.end(), t.float_layers.begin(), t.float_layers.end());
        q->max_accuracy_drop = 0;
      }
    }
    return out;
  }

  torch::jit::Module Apply(torch::jit::Module m, const std::vector<StepSpec>& steps,
                           std::vector<std::string>& notes, Trial& t) {
    StepContext sc = *ctx_.step;
    const std::string label = "trial " + std::to_string(t.index) + ": " + t.name;
    sc.train.progress = [this, label](double within, const std::string& msg) {
      Progress(label + ": " + msg + Num(" (%.0f%%)", 100 * within));
    };
    for (size_t i = 0; i < steps.size(); ++i) {
      const StepSpec& step = steps[i];
      if (i > 0) m = Reloaded(m);
      if (const auto* q = std::get_if<StaticQuantSpec>(&step); q && q->max_accuracy_drop > 0) {
        std::vector<std::vector<at::Tensor>> more;
        auto batches = CalibrationBatches(sc, q->calibration_batches, notes, more);
        m.to(c10::kCPU);
        // Accuracy control measures a quantization per layer: at most 40% of the budget, and
        // never past its end.
        const double until = std::min(Elapsed() + 0.4 * spec_.time_budget_seconds, spec_.time_budget_seconds);
        m = QuantizeWithAccuracyControl(m, *q, batches, more, *scorer_, notes, sc.train.progress,
                                        &t.float_layers, [this, until] { return Elapsed() > until; });
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

  // The module saved and loaded back, as a job hands a step's model to the next: parameters a pass
  // derived from others (a pruned layer's) become plain leaves that train again.
  static torch::jit::Module Reloaded(torch::jit::Module& m) {
    std::stringstream buf;
    m.save(buf);
    torch::jit::Module out = torch::jit::load(buf, c10::Device(c10::kCPU));
    out.eval();
    return out;
  }

  // Builds (or takes from the checkpoint) a candidate and records it; returns its index, or -1
  // when it was not run (the budget is spent).
  int Add(int base, std::vector<StepSpec> steps, const std::string& name, const std::string& family) {
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
    if (!Resume(t)) Build(t);
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

  // Gains below the timing noise do not count for latency.
  double MinGain() const { return spec_.objective == "LATENCY" ? 0.05 : 0.0; }

  std::string DropText(double drop) const {
    return std::string(scorer_->labelled() ? "top-1 " : "agreement ") + (drop > 0 ? "-" : "+") +
           Num("%.2f", std::abs(drop));
  }

  bool Resume(Trial& t) {
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

  void Build(Trial& t) {
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

  void Score(Trial& t) const {
    t.drop = (base_score_ - t.score) * 100.0;
    double before = ObjectiveValue(trials_[0].stats);
    if (spec_.objective == "LATENCY" && t.original_p50 > 0) before = t.original_p50;
    const double after = t.stats.is_object() ? ObjectiveValue(t.stats) : 0;
    t.ratio = t.error.empty() && after > 0 ? before / after : 0.0;
    t.recipe = Json::array();
    if (t.base >= 0) t.recipe = trials_[t.base].recipe;
    for (const auto& s : PlainSteps(t)) t.recipe.push_back(RecipeStepJson(s));
  }

  Json Record(const Trial& t) const {
    Json j = {{"index", t.index},
              {"name", t.name},
              {"key", t.key},
              {"base", t.base},
              {"recipe", {{"steps", t.recipe}}},
              {"score", t.score},
              {"drop", t.drop},
              {"ratio", t.ratio},
              {"meets_goal", t.meets},
              {"stats", t.stats},
              {"wall_seconds", t.wall_seconds},
              {"notes", t.notes},
              {"resumed", t.resumed}};
    if (!t.error.empty()) j["error"] = t.error;
    if (!t.float_layers.empty()) j["float_layers"] = t.float_layers;
    if (t.epoch_seconds > 0) j["epoch_seconds"] = t.epoch_seconds;
    if (t.original_p50 > 0) j["original_p50_ms"] = t.original_p50;
    j["score_images"] = score_images_;
    return j;
  }

  void Checkpoint() const {
    if (!ctx_.checkpoint) return;
    Json all = Json::array();
    for (size_t i = 1; i < trials_.size(); ++i) all.push_back(Record(trials_[i]));
    ctx_.checkpoint(all);
  }

  // Static INT8 of `base`'s model with accuracy control: layers fall back to float, most
  // sensitive first, until the drop (with what `base` lost already) is within the goal.
  // The whole model first (one quantization, and the fastest INT8 point for the Pareto front even
  // when it loses too much); accuracy control only when it does.
  int StaticInt8(const std::string& prefix, int base) {
    const double left = goal_points_ - (base < 0 ? 0.0 : trials_[base].drop);
    if (left <= 0 || Done()) return -1;
    const std::string family = base < 0 ? "static INT8" : trials_[base].family + " + static INT8";
    const int whole = Add(base, {StaticQuantSpec{}}, prefix + "static INT8", family);
    if (whole < 0 || Passes(whole) || !trials_[whole].error.empty() || Done()) return whole;
    StaticQuantSpec q;
    q.max_accuracy_drop = std::max(left, 1e-3);
    return Add(base, {q}, prefix + "static INT8 with accuracy control", family);
  }

  // Distillation from the original as the bench's hand recipes recover pruned models: Adam at
  // 0.002, batches of 128, T = 4, alpha = 0.7.
  DistillSpec Recovery(int epochs) const {
    DistillSpec d;
    d.train.epochs = epochs;
    d.train.learning_rate = 0.002;
    d.train.batch_size = 128;
    d.train.optimizer = "ADAM";
    d.temperature = 4.0;
    d.alpha = 0.7;
    return d;
  }

  // Kept channels in multiples of 8 (what vector kernels like) on networks wide enough for it;
  // narrow ones (a 32-channel CNN) are cut to any count, or 8 would be most of a layer.
  int RoundTo() {
    if (round_to_ == 0) {  // found once: the original does not change
      int64_t widest = 0;
      for (const auto& w : PrunableWeights(original_))
        if (w.is_conv) widest = std::max<int64_t>(widest, w.weight.size(0));
      round_to_ = widest >= 128 ? 8 : 1;
    }
    return round_to_;
  }

  // Epochs of distillation a pruned candidate gets: about a tenth of the budget each, from the
  // measured time of an epoch (one until an epoch has been timed).
  int RecoveryEpochs() const {
    if (epoch_seconds_ <= 0) return 1;
    return std::clamp(int(0.1 * spec_.time_budget_seconds / epoch_seconds_), 1, 8);
  }

  int Pruned(double target, int epochs) {
    ChannelPruneSpec p;
    p.target_macs = target;
    p.round_to = RoundTo();
    std::vector<StepSpec> steps = {p};
    std::string name = "prune.channel " + Num("%.0f%% MACs", 100 * target);
    if (epochs > 0) {
      steps.push_back(Recovery(epochs));
      name += " + distill " + std::to_string(epochs) + " ep";
    }
    return Add(-1, steps, name, "channel pruning");
  }

  // Channel pruning to a fraction of the MACs, each recovered by distillation when there is
  // train data: 50% first, then harder while the goal holds, or gentler until it does; once a
  // target passes and a harder one fails, the gap between them is bisected (to a 25% step).
  void PruneLadder() {
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

  // Where uniform pruning lost too much, non-uniform: each channel group pruned as far as its
  // measured sensitivity allows (GuidedAmounts), at the gentlest target uniform pruning failed,
  // then harder while that holds.
  void GuidedPrune() {
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

  // Each prunable group's loss (points) when pruned alone at 25, 50 and 75%, no training: the
  // analyze step's table for the original, measured once.
  bool Sensitivities() {
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
                       " channel group(s) each pruned alone at 25/50/75% (" + r.metric +
                       ", no training) in " +
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

  // Per-group amounts that keep at most `target` of the MACs: every group pruned to the largest
  // measured amount whose loss is at most a threshold, the threshold the least that reaches the
  // target (one channel analysis, many cuts). nullopt when none does.
  std::optional<std::map<std::string, double>> GuidedAmounts(double target) {
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

  bool Passes(int i) const { return trials_[i].error.empty() && trials_[i].drop <= goal_points_; }

  // The best pruned candidates within the goal, finished with INT8 (on what accuracy they have
  // left) or frozen.
  void CombineWithPruned() {
    std::vector<int> pruned;
    for (const auto& t : trials_)
      if (t.pruned && !t.frozen && t.error.empty() && t.drop <= goal_points_) pruned.push_back(t.index);
    std::sort(pruned.begin(), pruned.end(),
              [&](int a, int b) { return trials_[a].ratio > trials_[b].ratio; });
    if (pruned.size() > 2) pruned.resize(2);
    for (int p : pruned) {
      if (Int8("quantize.static")) StaticInt8(trials_[p].name + " + ", p);
      if (Allowed("optimize") && !Done())
        Add(p, {OptimizeSpec{}}, trials_[p].name + " + optimize", trials_[p].family + " + freezing");
    }
  }

  void Factorize() {
    FactorizeSpec f;
    f.energy = 0.9;
    std::vector<StepSpec> steps = {f};
    std::string name = "factorize (90% energy)";
    if (Distills()) {
      steps.push_back(Recovery(RecoveryEpochs()));
      name += " + distill " + std::to_string(RecoveryEpochs()) + " ep";
    } else {
      name += ", not recovered";
    }
    Add(-1, steps, name, "factorization");
  }

  // Every trial not beaten on both the objective and the score.
  Json Front() const {
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

  // What each method family reached within the goal, for the report's "why".
  std::string Measured() const {
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

  AutoResult Finish() {
    AutoResult r;
    const Trial* best = Best();
    const Trial* chosen = best;
    // No winner: the closest is the least drop among those that gained, else among all.
    for (const bool gained : {true, false}) {
      for (const auto& t : trials_) {
        if (chosen && chosen->meets) break;
        if (t.index == 0 || !t.error.empty() || (gained && t.ratio <= 1.0 + MinGain())) continue;
        if (!chosen || t.drop < chosen->drop || (t.drop == chosen->drop && t.ratio > chosen->ratio))
          chosen = &t;
      }
      if (chosen) break;
    }
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
    const std::string measured = "measured on " + host + ", within the goal: " + Measured();
    if (chosen) {
      r.module = ModelOf(chosen->index);
      search["chosen"] = chosen->index;
      search["recipe"] = {{"steps", chosen->recipe}};
    } else {
      r.module = original_;
    }
    const std::string goal = Num("%.3g", goal_points_) + " points of " + metric;
    if (best) {
      search["why"] = "trial " + std::to_string(best->index) + " (" + best->name + ") has the best " +
                      spec_.objective + " ratio within the goal (" + RatioText(best->ratio, spec_.objective) +
                      ", " + DropText(best->drop) + "); " + measured;
      r.notes.push_back("auto: chose " + search["why"].get<std::string>());
    } else {
      r.unreachable = Unreachable(chosen, goal);
      search["why"] = r.unreachable + "; " + measured;
    }
    r.notes.push_back(
        "auto: " + std::to_string(trials_.size() - 1) + " trial(s) in " + Num("%.0f s", Elapsed()) +
        " of a " + Num("%.0f s", spec_.time_budget_seconds) + " budget" +
        (resumed ? ", " + std::to_string(resumed) + " taken from an earlier attempt's checkpoint" : "") +
        "; accuracy is " + metric + " (original " + Num("%.2f", base_score_ * 100) + ")");
    if (!scorer_->labelled())
      r.notes.push_back(
          "auto: no labelled eval set, so the drop is in top-1 agreement with the original, not accuracy");
    r.notes.insert(r.notes.end(), notes_.begin(), notes_.end());
    if (chosen)
      r.notes.push_back("auto: the plain recipe that rebuilds the result: " + search["recipe"].dump());
    for (const auto& t : trials_)
      if (!t.path.empty() && (!chosen || t.index != chosen->index)) fs::remove(t.path);
    if (chosen && !chosen->path.empty()) fs::remove(chosen->path);
    r.search = search;
    return r;
  }

  // Why no candidate met the goal: what came closest, and each method's best drop.
  std::string Unreachable(const Trial* closest, const std::string& goal) const {
    bool accurate = false;  // some candidate kept the accuracy, but none gained
    for (const auto& t : trials_)
      accurate = accurate || (t.index > 0 && t.error.empty() && t.drop <= goal_points_);
    std::string why = accurate ? "no candidate within the accuracy goal (at most " + goal +
                                     " lost) improved the " + spec_.objective + " on this worker"
                               : "no candidate met the accuracy goal (at most " + goal + " lost)";
    if (!closest) return why + ": no candidate could be built in the time budget";
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

  // Where the candidates were timed: what decides whether INT8 or pruning pays.
  std::string Host() const {
    if (ctx_.measure->device.is_cuda()) return "the GPU (" + ctx_.measure->device.str() + ")";
    const CpuFeatures& cpu = HostCpu();
    return (cpu.model.empty() ? std::string("this CPU") : cpu.model) + " (" + cpu.Extensions() +
           (cpu.FastInt8() ? "; int8 products summed in 32 bits: fast INT8)"
                           : "; no AVX-512 VNNI or AMX: INT8 gains little)");
  }

  const torch::jit::Module& original_;
  const AutoSpec& spec_;
  const AutoContext& ctx_;
  const Clock::time_point start_;
  std::unique_ptr<Scorer> scorer_;
  double base_score_ = 0, goal_points_ = 0;
  double epoch_seconds_ = 0;  // one distillation epoch, once timed
  double spent_before_ = 0;   // seconds an earlier attempt spent on the trials taken from its checkpoint
  int64_t score_images_ = 0;  // how many images candidates are scored on
  double ladder_failed_ = 0;
  int round_to_ = 0;         // RoundTo's answer, once found
  bool int8_noted_ = false;  // the gentlest MACs target uniform pruning lost too much at
  bool analysed_ = false;
  std::map<std::string, std::vector<std::pair<double, double>>> group_loss_;  // group -> (amount, points)
  torch::jit::Module pruner_model_;
  torch::jit::Module baseline_model_;  // the original, loaded once and timed beside each candidate
  std::unique_ptr<ChannelPruner> pruner_;
  double original_macs_ = 0;
  std::vector<Trial> trials_;  // [0] is the original
  std::vector<std::string> notes_;
};

}  // namespace

AutoResult AutoSearch(const torch::jit::Module& model, const AutoSpec& spec, const AutoContext& ctx) {
  return Search(model, spec, ctx).Run();
}

}  // namespace pare::engine
