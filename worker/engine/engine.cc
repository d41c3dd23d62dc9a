#include "worker/engine/engine.h"

#include <dlfcn.h>
#include <malloc.h>

#include <cstdlib>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <unordered_set>

#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include "worker/engine/auto_search.h"
#include "worker/engine/cpu_features.h"
#include "worker/engine/dataset.h"
#include "worker/engine/error.h"
#include "worker/engine/job_inputs.h"
#include "worker/engine/latency_cache.h"
#include "worker/engine/measure.h"
#include "worker/engine/model_util.h"
#include "worker/engine/steps.h"

namespace pare::engine {
namespace {

namespace fs = std::filesystem;

// Lets the engine's own exceptions through and turns LibTorch's into EngineError.
template <typename F>
auto Guard(Code code, const std::string& reason, const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const EngineError&) {
    throw;
  } catch (const Cancelled&) {
    throw;
  } catch (const std::exception& e) {
    throw EngineError(code, reason, what + ": " + ErrorText(e));
  }
}

c10::Device ResolveDevice(const std::string& device) {
  bool cuda = torch::cuda::is_available();
  if (device == "cpu") return c10::kCPU;
  if (device == "cuda") {
    if (!cuda) {
      throw EngineError(Code::kFailedPrecondition, "NO_CUDA",
                        "the job asks for cuda but this worker has no GPU");
    }
    return c10::Device(c10::kCUDA, 0);
  }
  if (device.empty() || device == "auto") return cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  throw EngineError(Code::kInvalidArgument, "BAD_DEVICE",
                    "device must be cpu, cuda or auto, not '" + device + "'");
}

// A function of the OpenBLAS this process loaded, or null (another BLAS).
template <typename F>
F OpenBlas(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
}

// openblas_get_parallel(): how the loaded OpenBLAS runs its threads.
constexpr int kOpenBlasSequential = 0, kOpenBlasPthreads = 1, kOpenBlasOpenMP = 2;

}  // namespace

std::string BlasName() {
  auto config = OpenBlas<char* (*)()>("openblas_get_config");
  auto parallel = OpenBlas<int (*)()>("openblas_get_parallel");
  if (!config || !parallel) return "libblas.so.3 (not OpenBLAS)";
  std::string name = config();
  // "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64": name and version.
  auto second_space = name.find(' ', name.find(' ') + 1);
  if (second_space != std::string::npos) name.resize(second_space);
  switch (parallel()) {
    case kOpenBlasSequential: return name + " (sequential)";
    case kOpenBlasPthreads: return name + " (pthreads)";
    case kOpenBlasOpenMP: return name + " (OpenMP)";
    default: return name;
  }
}

namespace {
// glibc's fixed allocator thresholds for job processes (InitProcess); bench/run_all.sh gives
// Python the same through MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_.
constexpr int kMmapThreshold = 32 << 20, kTrimThreshold = 256 << 20;

ThreadChoice& Threads() {
  static ThreadChoice choice{0, "not set"};
  return choice;
}

// LibTorch's warnings, each distinct one printed once: a model's own `warnings.warn` in its
// forward (torchvision's scripted GoogLeNet warns on every call) would otherwise print once per
// run, hundreds of times in a job's log.
class WarnOnce : public c10::WarningHandler {
 public:
  void process(const c10::SourceLocation& where, const std::string& msg, const bool verbatim) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Past 1000 distinct ones, every warning is printed (none is lost).
      if (seen_.size() < 1000 && !seen_.insert(msg).second) return;
    }
    base_.process(where, msg, verbatim);
  }

 private:
  std::mutex mu_;
  std::unordered_set<std::string> seen_;
  c10::WarningHandler base_;  // LibTorch's own: prints to stderr
};
}  // namespace

ThreadChoice ThreadsFor(int num_threads, const CpuBudget& usable, int cpu_share) {
  if (num_threads > 0) return {num_threads, "--threads " + std::to_string(num_threads)};
  if (cpu_share <= 1) return {usable.cpus, usable.why};
  const int each = std::max(1, usable.cpus / cpu_share);
  return {each, usable.why + "; shared by " + std::to_string(cpu_share) +
                    " workers: " + std::to_string(each) + " each"};
}

ThreadChoice InitProcess(int num_threads, const std::string& quantized_engine, int cpu_share) {
  ThreadChoice& choice = Threads();
  choice = ThreadsFor(num_threads, num_threads > 0 ? CpuBudget{} : UsableCpus(), cpu_share);
  at::set_num_threads(choice.threads);
  static WarnOnce warn_once;
  c10::Warning::set_warning_handler(&warn_once);
#ifdef __GLIBC__
  // glibc serves blocks above its mmap threshold (128 KiB at first) with mmap and unmaps them
  // when freed, raising the threshold only once large blocks have come back: early in a process
  // a 224x224 model's activations are mapped and unmapped op after op (page faults), so batch-1
  // latency depended on what the process ran before (MobileNetV2 at 6.6 to 11 ms in fresh
  // Python processes on this project's AMD EPYC). Fixed thresholds keep it steady; an operator's MALLOC_*
  // settings win.
  if (!std::getenv("MALLOC_MMAP_THRESHOLD_") && !std::getenv("MALLOC_TRIM_THRESHOLD_")) {
    mallopt(M_MMAP_THRESHOLD, kMmapThreshold);
    mallopt(M_TRIM_THRESHOLD, kTrimThreshold);
  }
#endif
  // LibTorch splits its ops over its own OpenMP threads. OpenBLAS's OpenMP build (what the
  // engine links first, see its CMakeLists) shares them. Its pthread build starts as many
  // threads again inside each call, and they fight LibTorch's for the cores: a small CNN's
  // training step ran twice as slow, its linear layers' matrix products 30x. With that build,
  // one BLAS thread, unless the operator asked for more (OPENBLAS_NUM_THREADS).
  auto parallel = OpenBlas<int (*)()>("openblas_get_parallel");
  auto set_threads = OpenBlas<void (*)(int)>("openblas_set_num_threads");
  if (parallel && set_threads && parallel() == kOpenBlasPthreads && !std::getenv("OPENBLAS_NUM_THREADS")) {
    set_threads(1);
  }
  const auto& supported = at::globalContext().supportedQEngines();
  auto has = [&](at::QEngine e) {
    return std::find(supported.begin(), supported.end(), e) != supported.end();
  };
  at::QEngine want = at::QEngine::NoQEngine;
  if (quantized_engine == "qnnpack")
    want = at::QEngine::QNNPACK;
  else if (quantized_engine == "onednn")
    want = at::QEngine::ONEDNN;
  else if (quantized_engine == "fbgemm")
    want = at::QEngine::FBGEMM;
  else if (quantized_engine.empty() || quantized_engine == "auto") {
    for (auto e : {at::QEngine::X86, at::QEngine::FBGEMM, at::QEngine::ONEDNN, at::QEngine::QNNPACK}) {
      if (has(e)) {
        want = e;
        break;
      }
    }
  } else {
    throw EngineError(Code::kInvalidArgument, "BAD_ENGINE",
                      "unknown quantized engine '" + quantized_engine + "'");
  }
  if (want != at::QEngine::NoQEngine) {
    if (!has(want)) {
      throw EngineError(Code::kInvalidArgument, "BAD_ENGINE",
                        "quantized engine '" + quantized_engine + "' is not built into this LibTorch");
    }
    at::globalContext().setQEngine(want);
  }
  return choice;
}

namespace {

// One job's run: the original model measured, each step applied, saved, reloaded and measured,
// the result published. Compress's parts, sharing the job's settings and data.
class Job {
 public:
  Job(const std::string& input_path, const std::vector<StepSpec>& steps, const CompressOptions& options,
      const std::string& output_path)
      : input_path_(input_path), steps_(steps), options_(options), output_path_(output_path) {}
  // A job that failed (or was cancelled) leaves none of its steps' files behind.
  ~Job() {
    std::error_code ec;
    for (const auto& t : temps_) fs::remove(t, ec);
  }
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;

  Report Run() {
    torch::manual_seed(static_cast<uint64_t>(options_.seed));
    ctx_.device = ResolveDevice(options_.device);
    ctx_.latency_batches = options_.latency_batches;
    if (ctx_.latency_batches.empty())
      ctx_.latency_batches = ctx_.device.is_cuda() ? std::vector<int>{1, 32} : std::vector<int>{1};
    ctx_.latency_budget_seconds = options_.latency_budget_seconds;  // an auto step's trials
    timing_left_ = options_.latency_budget_seconds;
    ctx_.check_cancel = [this] { CheckCancel(); };

    Progress(0, "original", 0.0, "loading the model");
    model_ = LoadModel(input_path_);
    inputs_ = PrepareJobInputs(model_, steps_, options_);
    ChooseAgreementSamples();
    Report report = NewReport();
    Progress(0, "original", 0.5, "measuring the original model");
    report.steps.push_back(MeasureOriginal(report.host));
    current_path_ = input_path_;
    for (size_t i = 0; i < steps_.size(); ++i) report.steps.push_back(RunStep(i, report.steps.back().stats));
    report.search = search_;
    report.failure = failure_;
    Publish();
    Progress(static_cast<int>(steps_.size()), "done", 1.0, "done");
    return report;
  }

 private:
  using Clock = std::chrono::steady_clock;

  static double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

  void Progress(int index, const std::string& step, double within, const std::string& msg) {
    if (!options_.progress) return;
    const int count = static_cast<int>(steps_.size());
    ProgressUpdate u{index, count, step, (index + within) / (count + 1), msg};
    if (!options_.progress(u)) throw Cancelled();
  }
  void CheckCancel() {
    if (options_.progress && !options_.progress(ProgressUpdate{-1, 0, "", -1, ""})) throw Cancelled();
  }

  // Agreement compares outputs on the first images of the eval (else calibration) set, or on
  // random inputs of the model's shapes.
  void ChooseAgreementSamples() {
    ctx_.input_shape = inputs_.shape;
    ctx_.more_shapes = options_.more_input_shapes;
    ctx_.eval = inputs_.eval.labels.defined() ? &inputs_.eval : nullptr;
    const int64_t n = std::max(1, options_.agreement_samples);
    if (const Dataset* source = inputs_.SampleSource()) {
      ctx_.samples = source->images.slice(0, 0, std::min<int64_t>(n, source->images.size(0)));
      for (const at::Tensor& t : source->more_images)
        ctx_.more_samples.push_back(t.slice(0, 0, ctx_.samples.size(0)));
    } else {
      std::vector<int64_t> s = inputs_.shape;
      s[0] = n;
      ctx_.samples = at::randn(s);
      ctx_.more_samples = RandomInputs(options_.more_input_shapes, n, c10::kCPU);
    }
  }

  Report NewReport() const {
    Report report;
    report.device = ctx_.device.str();
    report.host.cpu = HostCpu().model;
    report.host.extensions = HostCpu().Extensions();
    report.host.fast_int8 = HostCpu().FastInt8();
    report.host.threads = at::get_num_threads();
    report.host.threads_why = Threads().threads ? Threads().why : "LibTorch's default";
    report.host.blas = BlasName();
    report.input_shape = inputs_.shape;
    report.more_input_shapes = options_.more_input_shapes;
    return report;
  }

  // The job's timing budget is shared by the models it measures (the original and each step's
  // result) and their batch sizes, so that its measuring costs what the user set however long
  // the recipe is: each model gets an even share of what is left, so a model that ran over its
  // share (its agreement samples all run, timed) leaves less to the later ones.
  double TimingShare() const {
    const size_t models = steps_.size() + 1 - models_timed_;
    return std::max(0.0, timing_left_) /
           static_cast<double>(std::max<size_t>(1, models) *
                               std::max<size_t>(1, ctx_.latency_batches.size()));
  }
  MeasureContext Shared() const {
    MeasureContext c = ctx_;
    c.latency_budget_seconds = TimingShare();
    return c;
  }
  void Timed(const ModelStats& stats) {
    for (const Latency& l : stats.latency) timing_left_ -= l.seconds;
    ++models_timed_;
  }

  StepReport MeasureOriginal(const HostInfo& host) {
    const auto t0 = Clock::now();
    StepReport original;
    original.step = "original";
    // Timing is most of a measurement: a model measured before on this host with these settings
    // takes its latency from the cache (the report says so and when it was measured).
    InputShapes all_shapes{inputs_.shape};
    all_shapes.insert(all_shapes.end(), options_.more_input_shapes.begin(), options_.more_input_shapes.end());
    const LatencyCache latency_cache(options_.latency_cache_dir, options_.model_digest, host,
                                     ctx_.device.str(), all_shapes, ctx_.latency_batches,
                                     options_.latency_budget_seconds);
    const auto cached = latency_cache.Find();
    MeasureContext original_ctx = Shared();
    if (cached) original_ctx.latency_batches.clear();
    // Its outputs on the agreement samples are the reference every step is compared with (they
    // come from its timed runs where it can).
    const bool default_shape = options_.input_shape.empty() && !inputs_.SampleSource();
    original.stats = Guard(
        Code::kInvalidArgument, "MODEL_RUN",
        "the model's forward failed on inputs of shape " + c10::str(at::IntArrayRef(inputs_.shape).slice(1)) +
            (default_shape ? " (the default: give the model's input shape, e.g. --input-shape 1,1,28,28)"
             : options_.input_shape.empty()
                 ? ""
                 : " (one sample of the input shape " + c10::str(at::IntArrayRef(options_.input_shape)) +
                       ", whose first dimension is the batch)"),
        [&] {
          model_.to(ctx_.device);
          return Measure(model_, input_path_, original_ctx, &ctx_.reference);
        });
    Timed(original.stats);
    if (!inputs_.shape_note.empty()) original.notes.push_back(inputs_.shape_note);
    for (auto& n : UnsteadyTimingNotes(original.stats)) original.notes.push_back(std::move(n));
    const Dataset* source = inputs_.SampleSource();
    original.notes.push_back(
        "agreement (top-1 agreement, cosines) on " + std::to_string(ctx_.samples.size(0)) + " " +
        (source == &inputs_.eval ? "images of the eval set (its first)"
         : source != nullptr     ? "images of the calibration set (its first)"
                                 : "random inputs (no dataset given)") +
        (ctx_.eval ? "; accuracy on all " + std::to_string(inputs_.eval.size()) + " eval images" : ""));
    if (ctx_.eval && !original.stats.top1_accuracy && !ctx_.reference.empty()) {
      original.notes.push_back(
          "no accuracy: the eval set has one label per sample, but the model's output is " +
          c10::str(ctx_.reference.front().second.sizes()) +
          ", not [N, classes] (agreement still compares the outputs)");
    }
    // A forward that turns N inputs into another number of rows (a `view(-1, K)` whose K does
    // not fit the input shape) usually means the input shape is wrong: the job goes on, the
    // report says so.
    for (const auto& [name, out] : ctx_.reference) {
      if (out.dim() > 0 && out.size(0) != ctx_.samples.size(0)) {
        original.notes.push_back("WARNING: the model turns " + std::to_string(ctx_.samples.size(0)) +
                                 " inputs into " + std::to_string(out.size(0)) + " output rows (output " +
                                 (name.empty() ? std::string("0") : name) + " " + c10::str(out.sizes()) +
                                 "): is the input shape " + c10::str(at::IntArrayRef(inputs_.shape)) +
                                 " the one it was written for?");
        break;
      }
    }
    if (cached) {
      original.stats.latency = cached->latency;
      original.notes.push_back(
          "latency from the measurement cache: this model was timed on this host with these settings at " +
          cached->measured_at);
    } else {
      latency_cache.Store(original.stats.latency);
    }
    original.wall_seconds = Since(t0);
    return original;
  }

  StepContext StepContextFor(size_t i, const std::string& name) {
    StepContext step_ctx{input_path_, TrainContext{}, inputs_.StepCalibration(), inputs_.shape,
                         options_.seed};
    step_ctx.models = &options_.models;
    step_ctx.more_inputs = options_.more_input_shapes;
    step_ctx.train.device = ctx_.device;
    step_ctx.train.train = inputs_.train.labels.defined() ? &inputs_.train : nullptr;
    step_ctx.train.eval = ctx_.eval;
    step_ctx.train.seed = options_.seed;
    step_ctx.samples = ctx_.samples;
    step_ctx.more_samples = ctx_.more_samples;
    step_ctx.train.progress = [this, i, name](double within, const std::string& msg) {
      Progress(static_cast<int>(i) + 1, name, 0.6 * within, msg);
    };
    return step_ctx;
  }

  // Applies step i, saves the result, reloads it (what the user gets must load on its own) and
  // measures it against `previous`, the stats of the model it started from.
  StepReport RunStep(size_t i, const ModelStats& previous) {
    const StepSpec& step = steps_[i];
    const std::string name = StepName(step);
    const std::string which = "step " + std::to_string(i + 1) + " (" + name + ")";
    Progress(static_cast<int>(i) + 1, name, 0.0, "running " + name);
    StepReport sr;
    sr.step = name;
    const auto start = Clock::now();
    StepContext step_ctx = StepContextFor(i, name);
    step_ctx.table = &sr.sensitivity;
    bool unchanged = false;
    Guard(Code::kInternal, "STEP_FAILED", which + " failed", [&] {
      if (const auto* a = std::get_if<AutoSpec>(&step))
        model_ = Search(*a, step_ctx, previous, sr.notes);
      else
        model_ = ApplyStep(model_, step, step_ctx, sr.notes, unchanged);
      std::string path = output_path_ + ".step" + std::to_string(i);
      model_.to(c10::kCPU);  // results load anywhere; measurements move it back to the device
      model_.save(path);
      temps_.push_back(path);
      current_path_ = path;
    });
    const auto saved = Clock::now();
    sr.wall_seconds = std::chrono::duration<double>(saved - start).count();
    model_ = Guard(Code::kInternal, "STEP_BROKE_MODEL", "after " + which + " the saved model does not load",
                   [&] { return LoadModel(current_path_); });
    sr.check_seconds = Since(saved);
    Progress(static_cast<int>(i) + 1, name, 0.6, "measuring after " + name);
    sr.stats = Guard(Code::kInternal, "STEP_BROKE_MODEL", "after " + which + " the model no longer runs",
                     [&] { return Measure(model_, current_path_, Shared()); });
    Timed(sr.stats);
    // Frozen (quantized) graphs are not counted: their arithmetic is the float model's.
    if (!sr.stats.macs && previous.macs) sr.stats.macs = previous.macs;
    // Steps that change the model's structure or number format are there to make it faster: say
    // so when it got slower (beyond timing noise). Training steps keep the structure, and a step
    // that changed nothing has nothing to compare (a difference is the machine's noise).
    const bool restructures =
        std::holds_alternative<ChannelPruneSpec>(step) || std::holds_alternative<FactorizeSpec>(step) ||
        std::holds_alternative<DynamicQuantSpec>(step) || std::holds_alternative<StaticQuantSpec>(step) ||
        std::holds_alternative<HalfPrecisionSpec>(step) || std::holds_alternative<OptimizeSpec>(step);
    if (restructures && !unchanged) {
      auto slower = SlowdownNotes(previous, sr.stats, 0.2);
      sr.notes.insert(sr.notes.end(), slower.begin(), slower.end());
    }
    if (std::holds_alternative<StaticQuantSpec>(step) && ctx_.device.is_cpu() && !HostCpu().FastInt8()) {
      sr.notes.push_back(Int8GainNote(previous, sr.stats, HostCpu()));
    }
    for (auto& n : UnsteadyTimingNotes(sr.stats)) sr.notes.push_back(std::move(n));
    return sr;
  }

  // The auto step: candidates built and measured as steps are; the best (else the closest, and
  // the job fails GOAL_UNREACHABLE with it and the report) goes on as the step's model.
  torch::jit::Module Search(const AutoSpec& spec, const StepContext& step_ctx, const ModelStats& original,
                            std::vector<std::string>& notes) {
    AutoContext a;
    a.step = &step_ctx;
    a.measure = &ctx_;
    a.original = &original;
    a.eval = inputs_.eval.size() ? &inputs_.eval : nullptr;
    a.work_prefix = output_path_ + ".auto";
    if (options_.resume_trials.is_array()) a.resume = options_.resume_trials;
    a.checkpoint = options_.checkpoint;
    AutoResult r = AutoSearch(model_, spec, a);
    notes.insert(notes.end(), r.notes.begin(), r.notes.end());
    search_ = r.search;
    if (!r.unreachable.empty())
      failure_ = JobFailure{"FAILED_PRECONDITION", kReasonGoalUnreachable, r.unreachable};
    return r.module;
  }

  // The last step's file becomes the output (the input's copy when there were no steps); the
  // intermediate files go.
  void Publish() {
    std::error_code ec;
    if (temps_.empty()) {
      fs::copy_file(input_path_, output_path_, fs::copy_options::overwrite_existing, ec);
    } else {
      fs::rename(temps_.back(), output_path_, ec);
      temps_.pop_back();
    }
    for (const auto& t : temps_) fs::remove(t);
    temps_.clear();
    if (ec) throw EngineError(Code::kInternal, "IO", "cannot write " + output_path_ + ": " + ec.message());
  }

  const std::string& input_path_;
  const std::vector<StepSpec>& steps_;
  const CompressOptions& options_;
  const std::string& output_path_;
  MeasureContext ctx_;
  double timing_left_ = 0;  // of the job's timing budget (TimingShare)
  size_t models_timed_ = 0;
  JobInputs inputs_;
  torch::jit::Module model_;
  std::string current_path_;
  std::vector<std::string> temps_;  // every step's saved file
  nlohmann::json search_;           // the auto step's search, if any
  std::optional<JobFailure> failure_;
};

}  // namespace

Report Compress(const std::string& input_path, const std::vector<StepSpec>& steps,
                const CompressOptions& options, const std::string& output_path) {
  return Job(input_path, steps, options, output_path).Run();
}

}  // namespace pare::engine
