#include "worker/engine/train.h"

#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <memory>
#include <optional>
#include <sstream>

#include "worker/engine/error.h"
#include "worker/engine/measure.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

constexpr double kPi = 3.14159265358979323846;

// forward's arguments for rows [begin, end) of a dataset (its images and any further inputs).
std::vector<c10::IValue> Rows(const Dataset& ds, int64_t begin, int64_t end, c10::Device device) {
  std::vector<at::Tensor> more;
  for (const at::Tensor& t : ds.more_images) more.push_back(t.slice(0, begin, end).to(device));
  return ForwardArgs(ds.images.slice(0, begin, end).to(device), more);
}

// The same for the rows listed in `idx`.
std::vector<c10::IValue> Rows(const Dataset& ds, const at::Tensor& idx, c10::Device device) {
  std::vector<at::Tensor> more;
  for (const at::Tensor& t : ds.more_images) more.push_back(t.index_select(0, idx).to(device));
  return ForwardArgs(ds.images.index_select(0, idx).to(device), more);
}

double Accuracy(torch::jit::Module& m, const Dataset& ds, c10::Device device) {
  m.eval();
  at::Tensor logits = RunBatched(m, ds.images, device, 256, nullptr, ds.more_images).flatten(1);
  return (logits.argmax(1) == ds.labels).to(at::kFloat).mean().item<double>();
}

// Parameters and buffers, to restore the best epoch's weights.
std::vector<at::Tensor> Snapshot(const torch::jit::Module& m) {
  std::vector<at::Tensor> out;
  torch::NoGradGuard no_grad;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  for (const auto& b : m.buffers()) out.push_back(b.detach().clone());
  return out;
}

void Restore(torch::jit::Module& m, const std::vector<at::Tensor>& saved) {
  torch::NoGradGuard no_grad;
  size_t i = 0;
  for (const auto& p : m.parameters()) p.copy_(saved[i++]);
  for (const auto& b : m.buffers()) b.copy_(saved[i++]);
}

// Float parameters of `student` (on ctx.device), set to require gradients; throws NOT_TRAINABLE
// when there are none (a quantized model).
std::vector<at::Tensor> TrainableParams(torch::jit::Module& student, const char* step) {
  std::vector<at::Tensor> params;
  for (const auto& p : student.parameters()) {
    if (p.is_floating_point()) params.push_back(p);
  }
  if (params.empty()) {
    throw EngineError(
        Code::kFailedPrecondition, "NOT_TRAINABLE",
        std::string(step) +
            ": the model has no float parameters left to train "
            "(quantized or frozen models cannot be trained: put quantize and optimize after training steps)");
  }
  for (auto& p : params) p.set_requires_grad(true);
  return params;
}

// Pruned weights stay pruned: a weight tensor with exact zeros (a dense trained one has
// practically none) keeps them through training. (weight, nonzero mask) pairs.
std::vector<std::pair<at::Tensor, at::Tensor>> PruningMasks(const std::vector<at::Tensor>& params) {
  std::vector<std::pair<at::Tensor, at::Tensor>> masks;
  for (const auto& p : params) {
    if (p.dim() < 2) continue;
    at::Tensor nonzero = p.detach() != 0;
    if (nonzero.logical_not().sum().item<int64_t>() * 100 > p.numel())
      masks.emplace_back(p, nonzero.to(p.device()));
  }
  return masks;
}

std::unique_ptr<torch::optim::Optimizer> MakeOptimizer(const TrainSpec& spec,
                                                       const std::vector<at::Tensor>& params,
                                                       const char* step) {
  if (spec.optimizer == "ADAM" || spec.optimizer == "Adam" || spec.optimizer == "adam") {
    return std::make_unique<torch::optim::Adam>(
        params, torch::optim::AdamOptions(spec.learning_rate).weight_decay(spec.weight_decay));
  }
  if (spec.optimizer.empty() || spec.optimizer == "SGD" || spec.optimizer == "sgd") {
    return std::make_unique<torch::optim::SGD>(
        params, torch::optim::SGDOptions(spec.learning_rate).momentum(0.9).weight_decay(spec.weight_decay));
  }
  throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
                    std::string(step) + ".optimizer must be SGD or ADAM");
}

// What the student learns from the teacher. A teacher that returns several tensors (a dict of
// class logits and boxes, say): the first (primary) one is distilled by softened KL, the further
// ones by mean squared error scaled by the teacher's variance, so each counts alike whatever its
// units. Needs each further output batch-first; otherwise only the primary one is distilled.
struct TeacherTargets {
  size_t further_outputs = 0;  // how many the models return beyond the primary one
  at::Tensor primary;          // the primary output for the whole train set, flattened
  std::vector<at::Tensor> further;
  std::vector<double> further_scale;

  // Checks that student and teacher outputs agree in shape on two samples (before any training
  // time is spent), then runs the teacher over the train set once: it is frozen and the inputs
  // are not augmented, so its outputs are computed in large inference batches, not every step.
  static TeacherTargets Compute(torch::jit::Module& student, torch::jit::Module& teacher,
                                const Dataset& train, c10::Device device) {
    TeacherTargets out;
    teacher.to(device);
    teacher.eval();
    const int64_t n = train.images.size(0);
    const int64_t probe_rows = std::min<int64_t>(2, n);
    std::vector<c10::IValue> probe = Rows(train, 0, probe_rows, device);
    c10::InferenceMode guard;
    student.eval();
    auto s_outs = OutputTensors(student.forward(probe));
    auto t_outs = OutputTensors(teacher.forward(probe));
    if (s_outs.size() != t_outs.size()) {
      throw EngineError(Code::kInvalidArgument, "SHAPE_MISMATCH",
                        "distill: the student returns " + std::to_string(s_outs.size()) +
                            " tensors, the teacher " + std::to_string(t_outs.size()));
    }
    bool further_ok = true;
    for (size_t k = 0; k < s_outs.size(); ++k) {
      auto s = s_outs[k].second.sizes().vec();
      auto t = t_outs[k].second.sizes().vec();
      if (s != t) {
        const std::string which = s_outs.size() > 1 ? "output '" + s_outs[k].first + "'" : "output";
        throw EngineError(Code::kInvalidArgument, "SHAPE_MISMATCH",
                          "distill: the student's " + which + " shape " + c10::str(at::IntArrayRef(s)) +
                              " does not match the teacher's " + c10::str(at::IntArrayRef(t)));
      }
      if (k > 0 && (s.empty() || s[0] != probe_rows)) further_ok = false;
    }
    out.further_outputs = s_outs.size() - 1;
    std::vector<at::Tensor> parts;
    std::vector<std::vector<at::Tensor>> further(further_ok ? out.further_outputs : 0);
    for (int64_t i = 0; i < n; i += 512) {
      auto outs = OutputTensors(teacher.forward(Rows(train, i, std::min(i + 512, n), device)));
      parts.push_back(outs[0].second.flatten(1).to(at::kFloat));
      for (size_t k = 0; k < further.size(); ++k) further[k].push_back(outs[k + 1].second.to(at::kFloat));
    }
    out.primary = at::cat(parts);
    for (auto& p : further) {
      at::Tensor t = at::cat(p);
      out.further_scale.push_back(1.0 / std::max(t.var().item<double>(), 1e-8));
      out.further.push_back(std::move(t));
    }
    return out;
  }

  std::optional<std::string> Note() const {
    if (!further_outputs) return std::nullopt;
    return further.empty()
               ? "distilled the first output only: the teacher's further outputs are not batch-first"
               : "distilled " + std::to_string(further_outputs) +
                     " further output(s) by mean squared error (scaled by the teacher's variance)";
  }

  // The distillation loss for rows `idx` of the train set, given the student's outputs and its
  // cross-entropy `hard` loss.
  at::Tensor Loss(const std::vector<std::pair<std::string, at::Tensor>>& outs, const at::Tensor& logits,
                  const at::Tensor& idx, const at::Tensor& hard, double temperature, double alpha) const {
    // A plain tensor outside inference mode, so autograd may read it.
    at::Tensor t_logits = primary.index_select(0, idx.to(primary.device())).clone();
    at::Tensor log_p_s = at::log_softmax(logits / temperature, 1);
    at::Tensor log_p_t = at::log_softmax(t_logits / temperature, 1);
    at::Tensor kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean();
    at::Tensor loss = alpha * temperature * temperature * kl + (1 - alpha) * hard;
    for (size_t k = 0; k < further.size(); ++k) {
      at::Tensor want = further[k].index_select(0, idx.to(further[k].device())).clone();
      loss = loss + alpha * further_scale[k] * at::mse_loss(outs[k + 1].second.to(at::kFloat), want);
    }
    return loss;
  }
};

// The epoch that scored best on the eval set, its weights kept to restore at the end.
struct BestEpoch {
  double accuracy = -1;
  int epoch = -1;
  std::vector<at::Tensor> weights;

  void Offer(double acc, int e, const torch::jit::Module& student) {
    if (acc <= accuracy) return;
    accuracy = acc;
    epoch = e;
    weights = Snapshot(student);
  }
  // Puts the best epoch's weights back when a later one was worse; says so in `notes`.
  void RestoreIfEarlier(torch::jit::Module& student, int epochs, std::vector<std::string>& notes) const {
    if (weights.empty() || epoch == epochs - 1) return;
    Restore(student, weights);
    notes.push_back("kept epoch " + std::to_string(epoch + 1) + ", the best on the eval set");
  }
};

void CheckTrainInputs(const char* step, const TrainSpec& spec, const TrainContext& ctx) {
  if (!ctx.train || !ctx.train->labels.defined()) {
    throw EngineError(Code::kInvalidArgument, "NO_TRAIN_DATA",
                      std::string(step) + " needs a train dataset with labels (submit --train)");
  }
  if (spec.epochs < 1 || spec.batch_size < 1 || !(spec.learning_rate > 0)) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
                      std::string(step) + ": epochs, batchSize and learningRate must be positive");
  }
}

// An epoch's note: its train loss and top-1, and the eval set's top-1 where it has labels (then
// the student is offered to `best`).
std::string EndEpoch(torch::jit::Module& student, int epoch, double loss_sum, int64_t correct, int64_t seen,
                     const TrainContext& ctx, BestEpoch& best) {
  std::ostringstream note;
  note.precision(4);
  note << "epoch " << epoch + 1 << ": train loss " << loss_sum / double(seen) << ", train top-1 "
       << double(correct) / double(seen);
  if (ctx.eval && ctx.eval->labels.defined()) {
    double acc = Accuracy(student, *ctx.eval, ctx.device);
    note << ", eval top-1 " << acc;
    best.Offer(acc, epoch, student);
  }
  return note.str();
}

}  // namespace

std::vector<std::string> Train(torch::jit::Module& student, torch::jit::Module* teacher,
                               const TrainSpec& spec, double temperature, double alpha,
                               const TrainContext& ctx) {
  const char* step = teacher ? "distill" : "finetune";
  CheckTrainInputs(step, spec, ctx);
  student.to(ctx.device);  // before taking the parameters the optimizer will update
  std::vector<at::Tensor> params = TrainableParams(student, step);
  const auto masks = PruningMasks(params);
  const Dataset& train = *ctx.train;
  auto opt = MakeOptimizer(spec, params, step);
  std::optional<TeacherTargets> targets;
  if (teacher) targets = TeacherTargets::Compute(student, *teacher, train, ctx.device);

  std::vector<std::string> notes;
  if (targets && targets->Note()) notes.push_back(*targets->Note());
  if (!masks.empty())
    notes.push_back("kept the zeros of " + std::to_string(masks.size()) + " pruned weight tensors");
  const int64_t n = train.images.size(0);
  const int64_t batch = std::min<int64_t>(spec.batch_size, n);
  const int64_t max_label = train.labels.max().item<int64_t>();
  const int64_t total_batches = (n + batch - 1) / batch * spec.epochs;
  at::Generator gen = at::detail::createCPUGenerator(ctx.seed);
  BestEpoch best;
  int64_t done_batches = 0;
  for (int epoch = 0; epoch < spec.epochs; ++epoch) {
    student.train();
    at::Tensor order = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
    double loss_sum = 0;
    int64_t seen = 0, correct = 0;
    for (int64_t i = 0; i < n; i += batch) {
      // Cosine learning-rate decay over all the step's batches.
      double lr =
          spec.learning_rate * 0.5 * (1 + std::cos(kPi * double(done_batches) / double(total_batches)));
      for (auto& group : opt->param_groups()) group.options().set_lr(lr);
      at::Tensor idx = order.slice(0, i, std::min(i + batch, n));
      at::Tensor y = train.labels.index_select(0, idx).to(ctx.device);
      auto outs = OutputTensors(student.forward(Rows(train, idx, ctx.device)));
      at::Tensor logits = outs[0].second.flatten(1);
      if (max_label >= logits.size(1)) {
        throw EngineError(Code::kInvalidArgument, "BAD_DATASET",
                          "train labels go up to " + std::to_string(max_label) + " but the model has " +
                              std::to_string(logits.size(1)) + " outputs");
      }
      at::Tensor loss = at::cross_entropy_loss(logits, y);
      if (targets) loss = targets->Loss(outs, logits, idx, loss, temperature, alpha);
      opt->zero_grad();
      loss.backward();
      opt->step();
      {
        torch::NoGradGuard no_grad;
        for (const auto& [p, mask] : masks) p.mul_(mask);
      }
      const int64_t b = idx.size(0);
      loss_sum += loss.item<double>() * double(b);
      correct += (logits.argmax(1) == y).sum().item<int64_t>();
      seen += b;
      ++done_batches;
      if (ctx.progress) {
        std::ostringstream msg;
        msg << "epoch " << epoch + 1 << "/" << spec.epochs << " loss " << loss_sum / double(seen);
        ctx.progress(double(done_batches) / double(total_batches), msg.str());
      }
    }
    notes.push_back(EndEpoch(student, epoch, loss_sum, correct, seen, ctx, best));
    if (ctx.progress) ctx.progress(double(done_batches) / double(total_batches), notes.back());
  }
  best.RestoreIfEarlier(student, spec.epochs, notes);
  for (auto& p : params) p.set_requires_grad(false);
  student.eval();
  return notes;
}

}  // namespace pare::engine
