#include "worker/engine/engine.h"

#include <dlfcn.h>

#include <cstdlib>

#include <algorithm>
#include <chrono>
#include <filesystem>

#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include "worker/engine/channel_prune.h"
#include "worker/engine/cpu_features.h"
#include "worker/engine/dataset.h"
#include "worker/engine/error.h"
#include "worker/engine/factorize.h"
#include "worker/engine/latency_cache.h"
#include "worker/engine/measure.h"
#include "worker/engine/model_util.h"
#include "worker/engine/prune.h"
#include "worker/engine/quantize.h"
#include "worker/engine/train.h"

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

torch::jit::Module LoadModel(const std::string& path) {
  try {
    torch::jit::Module m = torch::jit::load(path, c10::Device(c10::kCPU));
    m.eval();
    return m;
  } catch (const std::exception& e) {
    std::string text = ErrorText(e);
    // A zip without TorchScript's code and constants is what torch.save() writes (an eager
    // module or a state_dict): say how to make the file Pare needs.
    if (text.find("constants.pkl") != std::string::npos || text.find("code/") != std::string::npos) {
      text +=
          " (this looks like torch.save() of a module or a state_dict; save a TorchScript model with "
          "torch.jit.script(model).save(path) or torch.jit.trace(model, example).save(path))";
    }
    throw EngineError(Code::kInvalidArgument, "MODEL_LOAD",
                      "the model is not a loadable TorchScript file: " + text);
  }
}

// What a step may need beyond the model itself.
struct StepContext {
  const std::string& input_path;  // the job's input model: the default teacher
  TrainContext train;
  const Dataset* calibration = nullptr;  // calibration set, else the train set, else none
  std::vector<int64_t> input_shape;
  uint64_t seed = 0;
  const std::map<std::string, std::string>* models = nullptr;  // other models by id
  InputShapes more_inputs = {};                                // forward's further inputs
};

// Calibration inputs: `batches` batches of 8 from the dataset (a seeded sample), or
// standard-normal inputs of the model's shape when there is no dataset.
std::vector<at::Tensor> CalibrationBatches(const StepContext& ctx, int batches,
                                           std::vector<std::string>& notes,
                                           std::vector<std::vector<at::Tensor>>& more) {
  constexpr int64_t kBatch = 8;
  std::vector<at::Tensor> out;
  at::Generator gen = at::detail::createCPUGenerator(ctx.seed + 17);
  if (ctx.calibration) {
    const at::Tensor& images = ctx.calibration->images;
    int64_t want = std::min<int64_t>(images.size(0), kBatch * batches);
    at::Tensor idx =
        at::randperm(images.size(0), gen, at::TensorOptions().dtype(at::kLong)).slice(0, 0, want);
    for (int64_t i = 0; i < want; i += kBatch) {
      at::Tensor rows = idx.slice(0, i, std::min(i + kBatch, want));
      out.push_back(images.index_select(0, rows));
      std::vector<at::Tensor> further;
      for (const at::Tensor& t : ctx.calibration->more_images) further.push_back(t.index_select(0, rows));
      more.push_back(further);
    }
    notes.push_back("calibrated on " + std::to_string(want) + " images");
  } else {
    std::vector<int64_t> shape = ctx.input_shape;
    shape[0] = kBatch;
    for (int b = 0; b < batches; ++b) {
      out.push_back(at::randn(shape, gen));
      more.push_back(RandomInputs(ctx.more_inputs, kBatch, c10::kCPU, gen));
    }
    notes.push_back("WARNING: no calibration dataset was given; calibrated on " +
                    std::to_string(kBatch * batches) +
                    " synthetic standard-normal inputs, so activation ranges may not match real data");
  }
  return out;
}

// Applies one step to `current` and returns the new module.
// A rank-3 tensors dataset is either grayscale images (N x H x W, fed as N x 1 x H x W) or signals
// (N x C x L, fed as they are). The job's input shape decides when it names one; otherwise the
// model does: the grayscale reading when forward accepts one such sample (the long-standing
// reading, and a 2-d conv's), else the signal reading when forward accepts that.
void ResolveRank3Datasets(const std::vector<Dataset*>& datasets, const std::vector<int64_t>& input_shape,
                          torch::jit::Module& model) {
  const Dataset* first = nullptr;
  for (const Dataset* ds : datasets) {
    if (ds->size() && ds->rank3_ambiguous) {
      first = ds;
      break;
    }
  }
  if (!first) return;
  bool grayscale = true;
  if (!input_shape.empty()) {
    grayscale = input_shape.size() == 4 && input_shape[1] == 1;
  } else {
    auto accepts = [&](const at::Tensor& x) {
      std::vector<at::Tensor> more;
      for (const at::Tensor& t : first->more_images) more.push_back(t.slice(0, 0, 1));
      try {
        torch::NoGradGuard no_grad;
        model.eval();
        model.forward(ForwardArgs(x, more));
        return true;
      } catch (const std::exception&) {
        return false;
      }
    };
    const at::Tensor one = first->images.slice(0, 0, 1);
    grayscale = accepts(one.unsqueeze(1)) || !accepts(one);
  }
  for (Dataset* ds : datasets) {
    if (!ds->size() || !ds->rank3_ambiguous) continue;
    if (grayscale) ds->images = ds->images.unsqueeze(1).contiguous();
    ds->rank3_ambiguous = false;
  }
}

// Runs one step on `current`; `unchanged` is set when the step found nothing to change.
torch::jit::Module ApplyStep(torch::jit::Module current, const StepSpec& step, const StepContext& ctx,
                             std::vector<std::string>& notes, bool& unchanged) {
  struct V {
    torch::jit::Module& m;
    const StepContext& ctx;
    std::vector<std::string>& notes;
    bool& unchanged;
    void Add(const std::vector<std::string>& n) { notes.insert(notes.end(), n.begin(), n.end()); }
    torch::jit::Module operator()(const MagnitudePruneSpec& s) {
      Add(MagnitudePrune(m, s));
      return m;
    }
    torch::jit::Module operator()(const NMPruneSpec& s) {
      Add(NMPrune(m, s));
      return m;
    }
    torch::jit::Module operator()(const ChannelPruneSpec& s) {
      ChannelPruneResult r = ChannelPrune(m, s, ctx.input_shape, ctx.more_inputs);
      Add(r.notes);
      return r.module;
    }
    torch::jit::Module operator()(const FactorizeSpec& s) {
      FactorizeResult r = Factorize(m, s, ctx.input_shape, ctx.more_inputs);
      Add(r.notes);
      return r.module;
    }
    torch::jit::Module operator()(const DynamicQuantSpec&) {
      m.to(c10::kCPU);
      DynamicQuantResult r = QuantizeDynamic(m, /*in_place=*/true);  // m is replaced by the result
      Add(r.notes);
      if (r.linear + r.lstm + r.gru == 0) {
        notes.push_back("no linear, LSTM or GRU layer was found to quantize; the model is unchanged");
        unchanged = true;
      } else {
        notes.push_back("int8 weights: " + std::to_string(r.linear) + " linear, " + std::to_string(r.lstm) +
                        " LSTM, " + std::to_string(r.gru) + " GRU module(s)");
      }
      return r.module;
    }
    torch::jit::Module operator()(const StaticQuantSpec& s) {
      m.to(c10::kCPU);
      std::vector<std::vector<at::Tensor>> more;
      auto batches = CalibrationBatches(ctx, s.calibration_batches, notes, more);
      torch::jit::Module q = QuantizeStatic(m, s, batches, &notes, more);
      if (!IsQuantized(q)) notes.push_back("no conv or linear layer was quantized");
      return q;
    }
    torch::jit::Module operator()(const HalfPrecisionSpec& s) {
      if (!s.bf16 && ctx.train.device.is_cpu()) {
        // LibTorch has no float16 CPU kernels for convolutions: the result could not be run,
        // so it could not be measured or checked here.
        throw EngineError(
            Code::kFailedPrecondition, "NEEDS_CUDA",
            "quantize.fp16 produces a model for GPUs; run the job with --device cuda on a CUDA worker "
            "(quantize.bf16 also runs on CPUs)");
      }
      notes.push_back(std::string("weights in ") + (s.bf16 ? "bfloat16" : "float16") +
                      "; the model takes and returns float32 tensors");
      return ConvertHalf(m, s);
    }
    torch::jit::Module operator()(const FinetuneSpec& s) {
      Add(Train(m, nullptr, s.train, 1.0, 0.0, ctx.train));
      return m;
    }
    torch::jit::Module operator()(const DistillSpec& s) {
      if (!(s.temperature > 0) || s.alpha < 0 || s.alpha > 1) {
        throw EngineError(Code::kInvalidArgument, "BAD_RECIPE",
                          "distill needs temperature > 0 and alpha in [0, 1]");
      }
      auto path_of = [&](const std::string& id, const char* field) {
        if (!ctx.models || !ctx.models->count(id)) {
          throw EngineError(
              Code::kInvalidArgument, "MODEL_MISSING",
              std::string("distill.") + field + " names model '" + id + "', which this job was not given");
        }
        return ctx.models->at(id);
      };
      torch::jit::Module teacher =
          LoadModel(s.teacher_model.empty() ? ctx.input_path : path_of(s.teacher_model, "teacherModel"));
      torch::jit::Module student = m;
      if (!s.student_model.empty()) {
        student = LoadModel(path_of(s.student_model, "studentModel"));
        notes.push_back("student: uploaded model " + s.student_model);
      }
      if (!s.teacher_model.empty()) notes.push_back("teacher: uploaded model " + s.teacher_model);
      student.to(ctx.train.device);
      Add(Train(student, &teacher, s.train, s.temperature, s.alpha, ctx.train));
      return student;
    }
  };
  return std::visit(V{current, ctx, notes, unchanged}, step);
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
ThreadChoice& Threads() {
  static ThreadChoice choice{0, "not set"};
  return choice;
}
}  // namespace

ThreadChoice InitProcess(int num_threads, const std::string& quantized_engine) {
  ThreadChoice& choice = Threads();
  if (num_threads > 0) {
    choice = {num_threads, "--threads " + std::to_string(num_threads)};
  } else {
    CpuBudget budget = UsableCpus();
    choice = {budget.cpus, budget.why};
  }
  at::set_num_threads(choice.threads);
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

Report Compress(const std::string& input_path, const std::vector<StepSpec>& steps,
                const CompressOptions& options, const std::string& output_path) {
  using Clock = std::chrono::steady_clock;
  const int total = static_cast<int>(steps.size()) + 1;
  auto report_progress = [&](int index, const std::string& step, double within, const std::string& msg) {
    if (!options.progress) return;
    ProgressUpdate u{index, static_cast<int>(steps.size()), step, (index + within) / total, msg};
    if (!options.progress(u)) throw Cancelled();
  };
  auto check_cancel = [&]() {
    if (options.progress && !options.progress(ProgressUpdate{-1, 0, "", -1, ""})) throw Cancelled();
  };

  torch::manual_seed(static_cast<uint64_t>(options.seed));
  MeasureContext ctx;
  ctx.device = ResolveDevice(options.device);
  ctx.latency_batches = options.latency_batches;
  if (ctx.latency_batches.empty())
    ctx.latency_batches = ctx.device.is_cuda() ? std::vector<int>{1, 32} : std::vector<int>{1};
  ctx.latency_budget_seconds = options.latency_budget_seconds;
  ctx.check_cancel = check_cancel;

  report_progress(0, "original", 0.0, "loading the model");
  torch::jit::Module model = LoadModel(input_path);
  if (!model.find_method("forward")) {
    throw EngineError(Code::kInvalidArgument, "MODEL_FORMAT", "the model has no forward method");
  }
  {
    // A job feeds the model one input tensor (of the job's input shape).
    const auto& schema = model.get_method("forward").function().getSchema();
    std::vector<std::string> required;
    for (size_t i = 1; i < schema.arguments().size(); ++i) {
      if (!schema.arguments()[i].default_value()) required.push_back(schema.arguments()[i].name());
    }
    if (required.size() != 1 + options.more_input_shapes.size()) {
      std::string names;
      for (const auto& n : required) names += (names.empty() ? "" : ", ") + n;
      throw EngineError(
          Code::kInvalidArgument, "MODEL_INPUTS",
          "the model's forward takes " + std::to_string(required.size()) + " input(s) (" + names +
              ") but the job gives " + std::to_string(1 + options.more_input_shapes.size()) +
              " input shape(s): give one per input (pare compress --input-shape A --input-shape B)");
    }
    if (!options.more_input_shapes.empty()) {
      for (const auto& s : options.more_input_shapes) {
        bool ok = s.size() >= 2;
        for (int64_t d : s) ok &= d > 0;
        if (!ok) {
          throw EngineError(
              Code::kInvalidArgument, "BAD_INPUT_SHAPE",
              "input shape " + c10::str(s) + " needs 2 or more positive dimensions, batch first");
        }
      }
    }
  }

  Dataset eval, calibration, train;
  if (options.eval) eval = LoadDataset(options.eval->format, options.eval->path);
  if (options.calibration) calibration = LoadDataset(options.calibration->format, options.calibration->path);
  if (options.train) train = LoadDataset(options.train->format, options.train->path);
  for (const auto& step : steps) {
    if (NeedsTrainData(step) && !train.labels.defined()) {
      throw EngineError(Code::kInvalidArgument, "NO_TRAIN_DATA",
                        StepName(step) + " needs a train dataset with labels (--train)");
    }
  }
  ResolveRank3Datasets({&eval, &calibration, &train}, options.input_shape, model);
  const Dataset* sample_source = eval.size() ? &eval : (calibration.size() ? &calibration : nullptr);

  std::vector<int64_t> shape = options.input_shape;
  std::string shape_note;
  if (shape.empty()) {
    shape = sample_source ? std::vector<int64_t>(sample_source->images.sizes().vec())
                          : std::vector<int64_t>{1, 3, 224, 224};
    shape[0] = 1;
    shape_note = sample_source ? "input shape " + c10::str(shape) + " taken from the dataset's images"
                               : "input shape " + c10::str(shape) +
                                     " (the default: no input shape and no dataset given)";
  }
  for (int64_t d : shape) {
    if (d <= 0)
      throw EngineError(Code::kInvalidArgument, "BAD_INPUT_SHAPE",
                        "input shape " + c10::str(shape) + " has a non-positive dimension");
  }
  // Every dataset fits the model's inputs: `images` the first, `images_1`, `images_2`... the further ones.
  for (const auto& [ds, role] : {std::make_pair(&eval, "eval"), std::make_pair(&calibration, "calibration"),
                                 std::make_pair(&train, "train")}) {
    if (!ds->size()) continue;
    if (ds->more_images.size() != options.more_input_shapes.size()) {
      throw EngineError(Code::kInvalidArgument, "MODEL_INPUTS",
                        std::string("the ") + role + " dataset holds " +
                            std::to_string(1 + ds->more_images.size()) +
                            " input(s) per sample but the job gives the model " +
                            std::to_string(1 + options.more_input_shapes.size()) +
                            " (a tensors file holds the further inputs as images_1, images_2, ...)");
    }
    for (size_t i = 0; i < ds->more_images.size(); ++i) {
      auto got = ds->more_images[i].sizes().vec();
      const auto& want = options.more_input_shapes[i];
      if (!std::equal(got.begin() + 1, got.end(), want.begin() + 1, want.end())) {
        throw EngineError(Code::kInvalidArgument, "BAD_INPUT_SHAPE",
                          std::string("the ") + role + " dataset's images_" + std::to_string(i + 1) +
                              " are " + c10::str(at::IntArrayRef(got).slice(1)) + " but the model's input " +
                              std::to_string(i + 2) + " is " + c10::str(at::IntArrayRef(want).slice(1)));
      }
    }
    auto ds_shape = ds->images.sizes().vec();
    if (!std::equal(ds_shape.begin() + 1, ds_shape.end(), shape.begin() + 1, shape.end())) {
      throw EngineError(Code::kInvalidArgument, "BAD_INPUT_SHAPE",
                        std::string("the ") + role + " dataset's images are " + c10::str(ds_shape) +
                            " (one sample: " + c10::str(at::IntArrayRef(ds_shape).slice(1)) +
                            ") but the model's input shape is " + c10::str(shape) +
                            " (one sample: " + c10::str(at::IntArrayRef(shape).slice(1)) + ")");
    }
  }
  ctx.input_shape = shape;
  ctx.eval = eval.labels.defined() ? &eval : nullptr;
  int64_t n = std::max(1, options.agreement_samples);
  if (sample_source) {
    ctx.samples = sample_source->images.slice(0, 0, std::min<int64_t>(n, sample_source->images.size(0)));
  } else {
    std::vector<int64_t> s = shape;
    s[0] = n;
    ctx.samples = at::randn(s);
  }
  ctx.more_shapes = options.more_input_shapes;
  if (sample_source) {
    for (const at::Tensor& t : sample_source->more_images)
      ctx.more_samples.push_back(t.slice(0, 0, ctx.samples.size(0)));
  } else {
    ctx.more_samples = RandomInputs(options.more_input_shapes, n, c10::kCPU);
  }

  Report report;
  report.device = ctx.device.str();
  report.host.cpu = HostCpu().model;
  report.host.extensions = HostCpu().Extensions();
  report.host.fast_int8 = HostCpu().FastInt8();
  report.host.threads = at::get_num_threads();
  report.host.threads_why = Threads().threads ? Threads().why : "LibTorch's default";
  report.host.blas = BlasName();
  report.input_shape = shape;
  report.more_input_shapes = options.more_input_shapes;
  Guard(Code::kInvalidArgument, "MODEL_RUN",
        "the model's forward failed on inputs of shape " + c10::str(at::IntArrayRef(shape).slice(1)) +
            (options.input_shape.empty() && !sample_source
                 ? " (the default: give the model's input shape, e.g. --input-shape 1,1,28,28)"
                 : ""),
        [&] {
          model.to(ctx.device);
          ctx.reference =
              RunBatchedOutputs(model, ctx.samples, ctx.device, 8, check_cancel, ctx.more_samples);
        });

  report_progress(0, "original", 0.5, "measuring the original model");
  auto t0 = Clock::now();
  StepReport original;
  original.step = "original";
  // Timing is most of a measurement: a model measured before on this host with these settings
  // takes its latency from the cache (the report says so and when it was measured).
  InputShapes all_shapes{shape};
  all_shapes.insert(all_shapes.end(), options.more_input_shapes.begin(), options.more_input_shapes.end());
  const LatencyCache latency_cache(options.latency_cache_dir, options.model_digest, report.host,
                                   ctx.device.str(), all_shapes, ctx.latency_batches,
                                   ctx.latency_budget_seconds);
  const auto cached = latency_cache.Find();
  MeasureContext original_ctx = ctx;
  if (cached) original_ctx.latency_batches.clear();
  original.stats = Guard(Code::kInvalidArgument, "MODEL_RUN", "measuring the original model failed",
                         [&] { return Measure(model, input_path, original_ctx); });
  if (!shape_note.empty()) original.notes.push_back(shape_note);
  original.notes.push_back(
      "agreement (top-1 agreement, cosines) on " + std::to_string(ctx.samples.size(0)) + " " +
      (sample_source == &eval     ? "images of the eval set (its first)"
       : sample_source != nullptr ? "images of the calibration set (its first)"
                                  : "random inputs (no dataset given)") +
      (ctx.eval ? "; accuracy on all " + std::to_string(eval.size()) + " eval images" : ""));
  if (ctx.eval && !original.stats.top1_accuracy && !ctx.reference.empty()) {
    original.notes.push_back(
        "no accuracy: the eval set has one label per sample, but the model's output is " +
        c10::str(ctx.reference.front().second.sizes()) +
        ", not [N, classes] (agreement still compares the outputs)");
  }
  if (cached) {
    original.stats.latency = cached->latency;
    original.notes.push_back(
        "latency from the measurement cache: this model was timed on this host with these "
        "settings at " +
        cached->measured_at);
  } else {
    latency_cache.Store(original.stats.latency);
  }
  original.wall_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  report.steps.push_back(original);

  std::string current_path = input_path;
  std::vector<std::string> temps;
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string name = StepName(steps[i]);
    report_progress(static_cast<int>(i) + 1, name, 0.0, "running " + name);
    StepReport sr;
    sr.step = name;
    auto start = Clock::now();
    StepContext step_ctx{input_path, TrainContext{},
                         calibration.size() ? &calibration : (train.size() ? &train : nullptr), shape,
                         options.seed};
    step_ctx.train.device = ctx.device;
    step_ctx.models = &options.models;
    step_ctx.more_inputs = options.more_input_shapes;
    step_ctx.train.train = train.labels.defined() ? &train : nullptr;
    step_ctx.train.eval = ctx.eval;
    step_ctx.train.seed = options.seed;
    step_ctx.train.progress = [&](double within, const std::string& msg) {
      report_progress(static_cast<int>(i) + 1, name, 0.6 * within, msg);
    };
    bool unchanged = false;
    Guard(Code::kInternal, "STEP_FAILED", "step " + std::to_string(i + 1) + " (" + name + ") failed", [&] {
      model = ApplyStep(model, steps[i], step_ctx, sr.notes, unchanged);
      std::string path = output_path + ".step" + std::to_string(i);
      model.to(c10::kCPU);  // results load anywhere; measurements move it back to the device
      model.save(path);
      temps.push_back(path);
      current_path = path;
    });
    auto saved = Clock::now();
    sr.wall_seconds = std::chrono::duration<double>(saved - start).count();
    // What the user gets must load on its own.
    model = Guard(Code::kInternal, "STEP_BROKE_MODEL",
                  "after step " + std::to_string(i + 1) + " (" + name + ") the saved model does not load",
                  [&] { return LoadModel(current_path); });
    sr.check_seconds = std::chrono::duration<double>(Clock::now() - saved).count();
    report_progress(static_cast<int>(i) + 1, name, 0.6, "measuring after " + name);
    sr.stats = Guard(Code::kInternal, "STEP_BROKE_MODEL",
                     "after step " + std::to_string(i + 1) + " (" + name + ") the model no longer runs",
                     [&] { return Measure(model, current_path, ctx); });
    if (!sr.stats.macs && report.steps.back().stats.macs) {
      // Frozen (quantized) graphs are not counted: their arithmetic is the float model's.
      sr.stats.macs = report.steps.back().stats.macs;
    }
    // Steps that change the model's structure or number format are there to make it faster;
    // say so when it got slower (beyond timing noise). Training steps keep the structure.
    const StepSpec& st = steps[i];
    // A step that changed nothing has nothing to compare: a difference is the machine's noise.
    const bool restructures =
        std::holds_alternative<ChannelPruneSpec>(st) || std::holds_alternative<FactorizeSpec>(st) ||
        std::holds_alternative<DynamicQuantSpec>(st) || std::holds_alternative<StaticQuantSpec>(st) ||
        std::holds_alternative<HalfPrecisionSpec>(st);
    if (restructures && !unchanged) {
      auto slower = SlowdownNotes(report.steps.back().stats, sr.stats, 0.2);
      sr.notes.insert(sr.notes.end(), slower.begin(), slower.end());
    }
    if (std::holds_alternative<StaticQuantSpec>(st) && ctx.device.is_cpu() && !HostCpu().FastInt8()) {
      sr.notes.push_back(Int8GainNote(report.steps.back().stats, sr.stats, HostCpu()));
    }
    report.steps.push_back(sr);
  }

  std::error_code ec;
  if (temps.empty()) {
    fs::copy_file(input_path, output_path, fs::copy_options::overwrite_existing, ec);
  } else {
    fs::rename(temps.back(), output_path, ec);
    temps.pop_back();
  }
  for (const auto& t : temps) fs::remove(t);
  if (ec) throw EngineError(Code::kInternal, "IO", "cannot write " + output_path + ": " + ec.message());
  report_progress(total - 1, "done", 1.0, "done");
  return report;
}

}  // namespace pare::engine
