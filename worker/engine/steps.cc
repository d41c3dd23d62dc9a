#include "worker/engine/steps.h"

#include <algorithm>

#include "worker/engine/accuracy_control.h"
#include "worker/engine/analyze.h"
#include "worker/engine/channel_prune.h"
#include "worker/engine/error.h"
#include "worker/engine/factorize.h"
#include "worker/engine/measure.h"
#include "worker/engine/optimize.h"
#include "worker/engine/prune.h"
#include "worker/engine/quantize.h"

namespace pare::engine {

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

AnalyzeContext AnalysisContext(const StepContext& ctx) {
  AnalyzeContext a;
  a.input_shape = ctx.input_shape;
  a.more_shapes = ctx.more_inputs;
  a.eval = ctx.train.eval;
  a.samples = ctx.samples;
  a.more_samples = ctx.more_samples;
  a.progress = ctx.train.progress;
  return a;
}

namespace {

// Each step kind to its pass, over the module `m` (which a pass may change in place).
struct StepApplier {
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
    torch::jit::Module q;
    if (s.max_accuracy_drop) {
      const Scorer scorer(m, ctx.train.eval, ctx.samples, ctx.more_samples);
      q = QuantizeWithAccuracyControl(m, s, batches, more, scorer, notes, ctx.train.progress);
    } else {
      q = QuantizeStatic(m, s, batches, &notes, more);
    }
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
  torch::jit::Module operator()(const AnalyzeSpec& s) {
    m.to(c10::kCPU);
    AnalyzeContext a = AnalysisContext(ctx);
    if (s.quantize) a.calibration = CalibrationBatches(ctx, 4, notes, a.calibration_more);
    AnalyzeResult r = Analyze(m, s, a);
    Add(r.notes);
    if (ctx.table) *ctx.table = ToJson(r);
    unchanged = true;  // the table is the result; the model is as it was
    return m;
  }
  torch::jit::Module operator()(const AutoSpec&) {
    // The job runs a search itself (it measures every candidate as it measures steps).
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe, "auto must be the recipe's only step");
  }
  torch::jit::Module operator()(const OptimizeSpec&) {
    OptimizeResult r = OptimizeForInference(m);
    Add(r.notes);
    return r.module;
  }
  torch::jit::Module operator()(const DistillSpec& s) {
    if (!(s.temperature > 0) || s.alpha < 0 || s.alpha > 1) {
      throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
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

}  // namespace

torch::jit::Module ApplyStep(torch::jit::Module current, const StepSpec& step, const StepContext& ctx,
                             std::vector<std::string>& notes, bool& unchanged) {
  return std::visit(StepApplier{current, ctx, notes, unchanged}, step);
}

}  // namespace pare::engine
