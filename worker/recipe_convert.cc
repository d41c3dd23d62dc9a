#include "worker/recipe_convert.h"

#include <google/protobuf/util/json_util.h>

#include <nlohmann/json.hpp>

#include <algorithm>

namespace pare {
namespace {

std::string Upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

// Defaults: 1 epoch, learning rate 0.01, batch 64, SGD.
// A step's scope field: GLOBAL, or `local` (also what an empty one means).
Result<bool> GlobalScope(const std::string& where, const std::string& value, const std::string& local) {
  const std::string scope = Upper(value);
  if (scope == "GLOBAL") return true;
  if (scope.empty() || scope == local) return false;
  return InvalidArgument(where + ".scope must be " + local + " or GLOBAL, got '" + value + "'");
}

Result<engine::TrainSpec> ConvertTrain(const std::string& where, int epochs, float lr, int batch,
                                       const std::string& optimizer) {
  engine::TrainSpec t;
  if (epochs < 0 || epochs > 1000) return InvalidArgument(where + ".epochs must be in [1, 1000]");
  if (lr < 0 || lr > 10) return InvalidArgument(where + ".learningRate must be in (0, 10]");
  if (batch < 0 || batch > 65536) return InvalidArgument(where + ".batchSize must be in [1, 65536]");
  t.epochs = epochs == 0 ? 1 : epochs;
  t.learning_rate = lr == 0 ? 0.01 : lr;
  t.batch_size = batch == 0 ? 64 : batch;
  std::string o = Upper(optimizer);
  if (!(o.empty() || o == "SGD" || o == "ADAM"))
    return InvalidArgument(where + ".optimizer must be SGD or ADAM");
  t.optimizer = o.empty() ? "SGD" : o;
  return t;
}

Result<engine::StepSpec> Convert(const v1::Step& step, const std::string& at) {
  switch (step.kind_case()) {
    case v1::Step::kPrune: {
      const auto& p = step.prune();
      switch (p.method_case()) {
        case v1::PruneStep::kMagnitude: {
          const auto& m = p.magnitude();
          const std::string where = at + ".prune.magnitude";
          if (!(m.amount() >= 0.0f && m.amount() < 1.0f)) {
            return InvalidArgument(where + ".amount must be in [0, 1), got " + std::to_string(m.amount()));
          }
          engine::MagnitudePruneSpec s;
          s.amount = m.amount();
          PARE_ASSIGN_OR_RETURN(s.global, GlobalScope(where, m.scope(), "LAYER"));
          s.include.assign(m.include().begin(), m.include().end());
          s.exclude.assign(m.exclude().begin(), m.exclude().end());
          return engine::StepSpec(s);
        }
        case v1::PruneStep::kNm: {
          const auto& nm = p.nm();
          const std::string where = at + ".prune.nm";
          if (nm.m() < 2 || nm.m() > 64)
            return InvalidArgument(where + ".m must be in [2, 64], got " + std::to_string(nm.m()));
          if (nm.n() < 1 || nm.n() >= nm.m()) {
            return InvalidArgument(where + ".n must be in [1, m), got " + std::to_string(nm.n()));
          }
          return engine::StepSpec(engine::NMPruneSpec{nm.n(), nm.m()});
        }
        case v1::PruneStep::kChannel: {
          const auto& c = p.channel();
          const std::string where = at + ".prune.channel";
          if (!(c.amount() >= 0.0f && c.amount() < 1.0f)) {
            return InvalidArgument(where + ".amount must be in [0, 1), got " + std::to_string(c.amount()));
          }
          engine::ChannelPruneSpec s;
          s.amount = c.amount();
          std::string criterion = Upper(c.criterion());
          if (!criterion.empty()) s.criterion = criterion;
          if (!(s.criterion == "L1" || s.criterion == "L2" || s.criterion == "BN_SCALE")) {
            return InvalidArgument(where + ".criterion must be L1, L2 or BN_SCALE, got '" + c.criterion() +
                                   "'");
          }
          PARE_ASSIGN_OR_RETURN(s.global, GlobalScope(where, c.scope(), "UNIFORM"));
          if (c.round_to() < 0 || c.round_to() > 256) {
            return InvalidArgument(where + ".roundTo must be in [1, 256], got " +
                                   std::to_string(c.round_to()));
          }
          if (c.round_to() > 0) s.round_to = c.round_to();
          if (c.target_macs() != 0.0f) {
            if (!(c.target_macs() > 0.0f && c.target_macs() < 1.0f)) {
              return InvalidArgument(where + ".targetMacs must be in (0, 1), got " +
                                     std::to_string(c.target_macs()));
            }
            if (c.amount() != 0.0f) {
              return InvalidArgument(where + ": set amount or targetMacs, not both");
            }
            s.target_macs = c.target_macs();
          }
          return engine::StepSpec(s);
        }
        case v1::PruneStep::METHOD_NOT_SET:
          return InvalidArgument(at + ".prune needs one of magnitude, channel, nm");
      }
      break;
    }
    case v1::Step::kQuantize: {
      const auto& q = step.quantize();
      switch (q.method_case()) {
        case v1::QuantizeStep::kDynamic: return engine::StepSpec(engine::DynamicQuantSpec{});
        case v1::QuantizeStep::kStatic: {
          const auto& q2 = q.static_();
          const std::string where = at + ".quantize.static";
          engine::StaticQuantSpec s;
          std::string observer = Upper(q2.observer());
          if (!observer.empty()) s.observer = observer;
          if (!(s.observer == "MINMAX" || s.observer == "MOVING_AVERAGE" || s.observer == "HISTOGRAM" ||
                s.observer == "PERCENTILE")) {
            return InvalidArgument(
                where + ".observer must be MINMAX, MOVING_AVERAGE, HISTOGRAM or PERCENTILE, got '" +
                q2.observer() + "'");
          }
          if (q2.calibration_batches() < 0 || q2.calibration_batches() > 10000) {
            return InvalidArgument(where + ".calibrationBatches must be in [1, 10000]");
          }
          if (q2.calibration_batches() > 0) s.calibration_batches = q2.calibration_batches();
          s.per_channel = !q2.per_tensor_weights();
          std::string target = q2.target();
          std::transform(target.begin(), target.end(), target.begin(),
                         [](unsigned char c) { return std::tolower(c); });
          if (!target.empty()) s.target = target;
          if (!(s.target == "auto" || s.target == "avx2" || s.target == "vnni")) {
            return InvalidArgument(where + ".target must be auto, avx2 or vnni, got '" + q2.target() + "'");
          }
          return engine::StepSpec(s);
        }
        case v1::QuantizeStep::kFp16: return engine::StepSpec(engine::HalfPrecisionSpec{false});
        case v1::QuantizeStep::kBf16: return engine::StepSpec(engine::HalfPrecisionSpec{true});
        case v1::QuantizeStep::METHOD_NOT_SET:
          return InvalidArgument(at + ".quantize needs one of dynamic, static, fp16, bf16");
      }
      break;
    }
    case v1::Step::kDistill: {
      const auto& d = step.distill();
      const std::string where = at + ".distill";
      engine::DistillSpec s;
      for (const auto& [field, id] : {std::pair<const char*, std::string>{"teacherModel", d.teacher_model()},
                                      {"studentModel", d.student_model()}}) {
        if (id.size() > 64 || id.find_first_of(" /\\\n") != std::string::npos) {
          return InvalidArgument(where + "." + field + " is not a model id");
        }
      }
      s.teacher_model = d.teacher_model();
      s.student_model = d.student_model();
      auto train = ConvertTrain(where, d.epochs(), d.learning_rate(), d.batch_size(), d.optimizer());
      if (!train.ok()) return train.status();
      s.train = train.value();
      s.temperature = d.temperature() == 0 ? 4.0 : d.temperature();
      s.alpha = d.alpha();
      if (!(s.temperature > 0 && s.temperature <= 100))
        return InvalidArgument(where + ".temperature must be in (0, 100]");
      if (s.alpha < 0 || s.alpha > 1) return InvalidArgument(where + ".alpha must be in [0, 1]");
      return engine::StepSpec(s);
    }
    case v1::Step::kFactorize: {
      const auto& f = step.factorize();
      const std::string where = at + ".factorize";
      engine::FactorizeSpec s;
      if (f.rank_ratio() != 0 && f.energy() != 0) {
        return InvalidArgument(where + ": give rankRatio or energy, not both");
      }
      if (f.rank_ratio() != 0 && !(f.rank_ratio() > 0 && f.rank_ratio() <= 1)) {
        return InvalidArgument(where + ".rankRatio must be in (0, 1], got " + std::to_string(f.rank_ratio()));
      }
      if (f.energy() != 0 && !(f.energy() > 0 && f.energy() <= 1)) {
        return InvalidArgument(where + ".energy must be in (0, 1], got " + std::to_string(f.energy()));
      }
      s.rank_ratio = f.rank_ratio();
      s.energy = f.energy();
      if (s.rank_ratio == 0 && s.energy == 0) s.rank_ratio = 0.5;
      return engine::StepSpec(s);
    }
    case v1::Step::kFinetune: {
      const auto& f = step.finetune();
      PARE_ASSIGN_OR_RETURN(auto train, ConvertTrain(at + ".finetune", f.epochs(), f.learning_rate(),
                                                     f.batch_size(), f.optimizer()));
      return engine::StepSpec(engine::FinetuneSpec{train});
    }
    case v1::Step::KIND_NOT_SET:
      return InvalidArgument(at +
                             " is empty: a step needs one of prune, quantize, distill, factorize, finetune");
  }
  return InvalidArgument(at + ": unknown step");
}

}  // namespace

Result<v1::Recipe> ParseRecipeJson(const std::string& json) {
  // Strict JSON first: protobuf's parser lets a trailing comma through.
  try {
    const nlohmann::json checked = nlohmann::json::parse(json);
    (void)checked;
  } catch (const nlohmann::json::exception& e) {
    // parse_error for the syntax, out_of_range for a number no double holds (1e999).
    return InvalidArgument("recipe: not valid JSON (" + std::string(e.what()) + ")");
  }
  v1::Recipe recipe;
  google::protobuf::util::JsonParseOptions opts;
  opts.ignore_unknown_fields = false;
  auto st = google::protobuf::util::JsonStringToMessage(json, &recipe, opts);
  if (!st.ok()) return InvalidArgument("recipe: " + std::string(st.message()));
  return recipe;
}

Result<std::vector<engine::StepSpec>> ToEngineSteps(const v1::Recipe& recipe) {
  if (recipe.steps_size() == 0) return InvalidArgument("recipe.steps is empty: give at least one step");
  if (recipe.steps_size() > 32) return InvalidArgument("recipe.steps has more than 32 steps");
  std::vector<engine::StepSpec> out;
  for (int i = 0; i < recipe.steps_size(); ++i) {
    PARE_ASSIGN_OR_RETURN(auto r, Convert(recipe.steps(i), "steps[" + std::to_string(i) + "]"));
    out.push_back(std::move(r));
  }
  return out;
}

std::string FirstStepKind(const v1::Recipe& recipe) {
  if (recipe.steps_size() == 0) return "none";
  switch (recipe.steps(0).kind_case()) {
    case v1::Step::kPrune: return "prune";
    case v1::Step::kQuantize: return "quantize";
    case v1::Step::kDistill: return "distill";
    case v1::Step::kFactorize: return "factorize";
    case v1::Step::kFinetune: return "finetune";
    default: return "none";
  }
}

}  // namespace pare
