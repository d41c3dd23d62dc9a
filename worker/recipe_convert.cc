#include "worker/recipe_convert.h"

#include <google/protobuf/util/json_util.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <sstream>

namespace pare {
namespace {

std::string Upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

// A step's scope field: GLOBAL, or `local` (also what an empty one means).
Result<bool> GlobalScope(const std::string& where, const std::string& value, const std::string& local) {
  const std::string scope = Upper(value);
  if (scope == "GLOBAL") return true;
  if (scope.empty() || scope == local) return false;
  return InvalidArgument(where + ".scope must be " + local + " or GLOBAL, got '" + value + "'");
}

// Defaults: 1 epoch, learning rate 0.01, batch 64, SGD.
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

Result<engine::StepSpec> ConvertMagnitude(const v1::MagnitudePrune& m, const std::string& where) {
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

Result<engine::StepSpec> ConvertNM(const v1::NMPrune& nm, const std::string& where) {
  if (nm.m() < 2 || nm.m() > 64)
    return InvalidArgument(where + ".m must be in [2, 64], got " + std::to_string(nm.m()));
  if (nm.n() < 1 || nm.n() >= nm.m()) {
    return InvalidArgument(where + ".n must be in [1, m), got " + std::to_string(nm.n()));
  }
  return engine::StepSpec(engine::NMPruneSpec{nm.n(), nm.m()});
}

// Kept channels are rounded to a multiple of roundTo (0: the step's default).
constexpr int kMaxRoundTo = 256;
Status CheckRoundTo(int round_to, const std::string& where) {
  if (round_to < 0 || round_to > kMaxRoundTo) {
    return InvalidArgument(where + ".roundTo must be in [1, " + std::to_string(kMaxRoundTo) + "], got " +
                           std::to_string(round_to));
  }
  return Status::Ok();
}

Result<engine::StepSpec> ConvertChannel(const v1::ChannelPrune& c, const std::string& where) {
  if (!(c.amount() >= 0.0f && c.amount() < 1.0f)) {
    return InvalidArgument(where + ".amount must be in [0, 1), got " + std::to_string(c.amount()));
  }
  engine::ChannelPruneSpec s;
  s.amount = c.amount();
  std::string criterion = Upper(c.criterion());
  if (!criterion.empty()) s.criterion = criterion;
  if (!(s.criterion == "L1" || s.criterion == "L2" || s.criterion == "BN_SCALE")) {
    return InvalidArgument(where + ".criterion must be L1, L2 or BN_SCALE, got '" + c.criterion() + "'");
  }
  PARE_ASSIGN_OR_RETURN(s.global, GlobalScope(where, c.scope(), "UNIFORM"));
  PARE_RETURN_IF_ERROR(CheckRoundTo(c.round_to(), where));
  if (c.round_to() > 0) s.round_to = c.round_to();
  if (c.target_macs() != 0.0f) {
    if (!(c.target_macs() > 0.0f && c.target_macs() < 1.0f)) {
      return InvalidArgument(where + ".targetMacs must be in (0, 1), got " + std::to_string(c.target_macs()));
    }
    if (c.amount() != 0.0f) return InvalidArgument(where + ": set amount or targetMacs, not both");
    s.target_macs = c.target_macs();
  }
  if (!c.amounts().empty()) {
    if (s.global) return InvalidArgument(where + ".amounts works with the UNIFORM scope, not GLOBAL");
    if (s.target_macs != 0) return InvalidArgument(where + ".amounts cannot be combined with targetMacs");
    if (c.amounts().size() > 10000) return InvalidArgument(where + ".amounts has more than 10000 patterns");
    for (const auto& [pattern, amount] : c.amounts()) {
      const std::string at = where + ".amounts['" + pattern.substr(0, 64) + "']";
      if (pattern.empty() || pattern.size() > 512 ||
          pattern.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.*?[]") !=
              std::string::npos) {
        return InvalidArgument(at + " is not a layer-name pattern like 'layer4' or 'layer*.conv1'");
      }
      if (!(amount >= 0.0f && amount < 1.0f)) {
        return InvalidArgument(at + " must be in [0, 1), got " + std::to_string(amount));
      }
      s.amounts[pattern] = amount;
    }
  }
  return engine::StepSpec(s);
}

Result<engine::StepSpec> ConvertPrune(const v1::PruneStep& p, const std::string& at) {
  switch (p.method_case()) {
    case v1::PruneStep::kMagnitude: return ConvertMagnitude(p.magnitude(), at + ".prune.magnitude");
    case v1::PruneStep::kNm: return ConvertNM(p.nm(), at + ".prune.nm");
    case v1::PruneStep::kChannel: return ConvertChannel(p.channel(), at + ".prune.channel");
    case v1::PruneStep::METHOD_NOT_SET: break;
  }
  return InvalidArgument(at + ".prune needs one of magnitude, channel, nm");
}

Result<engine::StepSpec> ConvertStatic(const v1::StaticQuant& q, const std::string& where) {
  engine::StaticQuantSpec s;
  std::string observer = Upper(q.observer());
  if (!observer.empty()) s.observer = observer;
  if (!(s.observer == "MINMAX" || s.observer == "MOVING_AVERAGE" || s.observer == "HISTOGRAM" ||
        s.observer == "PERCENTILE")) {
    return InvalidArgument(where +
                           ".observer must be MINMAX, MOVING_AVERAGE, HISTOGRAM or PERCENTILE, got '" +
                           q.observer() + "'");
  }
  if (q.calibration_batches() < 0 || q.calibration_batches() > 10000) {
    return InvalidArgument(where + ".calibrationBatches must be in [1, 10000]");
  }
  if (q.calibration_batches() > 0) s.calibration_batches = q.calibration_batches();
  s.per_channel = !q.per_tensor_weights();
  std::string target = q.target();
  std::transform(target.begin(), target.end(), target.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  if (!target.empty()) s.target = target;
  if (!(s.target == "auto" || s.target == "avx2" || s.target == "vnni")) {
    return InvalidArgument(where + ".target must be auto, avx2 or vnni, got '" + q.target() + "'");
  }
  if (q.has_max_accuracy_drop()) {
    if (!(q.max_accuracy_drop() >= 0.0f && q.max_accuracy_drop() <= 100.0f)) {
      return InvalidArgument(where + ".maxAccuracyDrop must be in [0, 100] points, got " +
                             std::to_string(q.max_accuracy_drop()));
    }
    s.max_accuracy_drop = q.max_accuracy_drop();
  }
  if (q.exclude_size() > 10000) return InvalidArgument(where + ".exclude has more than 10000 entries");
  for (int i = 0; i < q.exclude_size(); ++i) {
    const std::string& path = q.exclude(i);
    const std::string at = where + ".exclude[" + std::to_string(i) + "]";
    if (path.empty() || path.size() > 512)
      return InvalidArgument(at + " must be a module path of 1 to 512 characters");
    const bool ok_chars =
        path.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.") ==
        std::string::npos;
    if (!ok_chars || path.front() == '.' || path.back() == '.' || path.find("..") != std::string::npos) {
      return InvalidArgument(at + " is not a module path like 'layer4.1.conv2': '" + path + "'");
    }
    if (std::find(s.exclude.begin(), s.exclude.end(), path) != s.exclude.end()) {
      return InvalidArgument(at + " repeats '" + path + "'");
    }
    s.exclude.push_back(path);
  }
  return engine::StepSpec(s);
}

Result<engine::StepSpec> ConvertQuantize(const v1::QuantizeStep& q, const std::string& at) {
  switch (q.method_case()) {
    case v1::QuantizeStep::kDynamic: return engine::StepSpec(engine::DynamicQuantSpec{});
    case v1::QuantizeStep::kStatic: return ConvertStatic(q.static_(), at + ".quantize.static");
    case v1::QuantizeStep::kFp16: return engine::StepSpec(engine::HalfPrecisionSpec{false});
    case v1::QuantizeStep::kBf16: return engine::StepSpec(engine::HalfPrecisionSpec{true});
    case v1::QuantizeStep::METHOD_NOT_SET: break;
  }
  return InvalidArgument(at + ".quantize needs one of dynamic, static, fp16, bf16");
}

Result<engine::StepSpec> ConvertDistill(const v1::DistillStep& d, const std::string& where) {
  engine::DistillSpec s;
  for (const auto& [field, id] : {std::pair<const char*, std::string>{"teacherModel", d.teacher_model()},
                                  {"studentModel", d.student_model()}}) {
    if (id.size() > 64 || id.find_first_of(" /\\\n") != std::string::npos) {
      return InvalidArgument(where + "." + field + " is not a model id");
    }
  }
  s.teacher_model = d.teacher_model();
  s.student_model = d.student_model();
  PARE_ASSIGN_OR_RETURN(s.train,
                        ConvertTrain(where, d.epochs(), d.learning_rate(), d.batch_size(), d.optimizer()));
  s.temperature = d.temperature() == 0 ? 4.0 : d.temperature();
  s.alpha = d.alpha();
  if (!(s.temperature > 0 && s.temperature <= 100))
    return InvalidArgument(where + ".temperature must be in (0, 100]");
  if (s.alpha < 0 || s.alpha > 1) return InvalidArgument(where + ".alpha must be in [0, 1]");
  return engine::StepSpec(s);
}

Result<engine::StepSpec> ConvertFactorize(const v1::FactorizeStep& f, const std::string& where) {
  engine::FactorizeSpec s;
  if (f.rank_ratio() != 0 && f.energy() != 0)
    return InvalidArgument(where + ": give rankRatio or energy, not both");
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

Result<engine::StepSpec> ConvertAnalyze(const v1::AnalyzeStep& a, const std::string& where) {
  engine::AnalyzeSpec s;
  if (a.prune_amounts_size() > 8) return InvalidArgument(where + ".pruneAmounts has more than 8 amounts");
  if (a.prune_amounts_size() > 0) s.prune_amounts.clear();
  for (int i = 0; i < a.prune_amounts_size(); ++i) {
    const float v = a.prune_amounts(i);
    if (!(v > 0.0f && v < 1.0f)) {
      return InvalidArgument(where + ".pruneAmounts[" + std::to_string(i) + "] must be in (0, 1), got " +
                             std::to_string(v));
    }
    if (std::find(s.prune_amounts.begin(), s.prune_amounts.end(), double(v)) != s.prune_amounts.end()) {
      return InvalidArgument(where + ".pruneAmounts[" + std::to_string(i) + "] repeats an amount");
    }
    s.prune_amounts.push_back(v);
  }
  if (a.max_layers() < 0 || a.max_layers() > 1000)
    return InvalidArgument(where + ".maxLayers must be in [1, 1000]");
  if (a.max_layers() > 0) s.max_layers = a.max_layers();
  s.quantize = !a.skip_quantize();
  s.prune = !a.skip_prune();
  PARE_RETURN_IF_ERROR(CheckRoundTo(a.round_to(), where));
  if (a.round_to() > 0) s.round_to = a.round_to();
  return engine::StepSpec(s);
}

Result<engine::StepSpec> ConvertAuto(const v1::AutoStep& a, const std::string& where) {
  engine::AutoSpec s;
  if (!a.has_max_accuracy_drop())
    return InvalidArgument(where + ".maxAccuracyDrop is required (top-1 points the result may lose)");
  if (!(a.max_accuracy_drop() >= 0.0f && a.max_accuracy_drop() <= 100.0f)) {
    return InvalidArgument(where + ".maxAccuracyDrop must be in [0, 100], got " +
                           std::to_string(a.max_accuracy_drop()));
  }
  s.max_accuracy_drop = a.max_accuracy_drop();
  s.relative = a.relative();
  const std::string objective = Upper(a.objective());
  if (!(objective.empty() || objective == "LATENCY" || objective == "SIZE" || objective == "MACS")) {
    return InvalidArgument(where + ".objective must be LATENCY, SIZE or MACS, got '" + a.objective() + "'");
  }
  s.objective = objective.empty() ? "LATENCY" : objective;
  if (a.target_speedup() != 0 && !(a.target_speedup() > 1.0f && a.target_speedup() <= 1000.0f)) {
    return InvalidArgument(where + ".targetSpeedup must be in (1, 1000], got " +
                           std::to_string(a.target_speedup()));
  }
  s.target_speedup = a.target_speedup();
  if (a.time_budget_seconds() > 86400)
    return InvalidArgument(where + ".timeBudgetSeconds must be in [1, 86400] (absent or 0: 900)");
  if (a.time_budget_seconds() > 0) s.time_budget_seconds = a.time_budget_seconds();
  static const std::vector<std::string> kMethods = {"prune.channel",    "distill",   "quantize.static",
                                                    "quantize.dynamic", "factorize", "optimize"};
  for (int i = 0; i < a.methods_size(); ++i) {
    const std::string& m = a.methods(i);
    if (std::find(kMethods.begin(), kMethods.end(), m) == kMethods.end()) {
      return InvalidArgument(where + ".methods[" + std::to_string(i) + "] '" + m +
                             "' is not one of prune.channel, distill, quantize.static, quantize.dynamic, "
                             "factorize, optimize");
    }
    if (std::find(s.methods.begin(), s.methods.end(), m) != s.methods.end())
      return InvalidArgument(where + ".methods[" + std::to_string(i) + "] repeats '" + m + "'");
    s.methods.push_back(m);
  }
  return engine::StepSpec(s);
}

Result<engine::StepSpec> Convert(const v1::Step& step, const std::string& at) {
  switch (step.kind_case()) {
    case v1::Step::kPrune: return ConvertPrune(step.prune(), at);
    case v1::Step::kQuantize: return ConvertQuantize(step.quantize(), at);
    case v1::Step::kDistill: return ConvertDistill(step.distill(), at + ".distill");
    case v1::Step::kFactorize: return ConvertFactorize(step.factorize(), at + ".factorize");
    case v1::Step::kFinetune: {
      const auto& f = step.finetune();
      PARE_ASSIGN_OR_RETURN(auto train, ConvertTrain(at + ".finetune", f.epochs(), f.learning_rate(),
                                                     f.batch_size(), f.optimizer()));
      return engine::StepSpec(engine::FinetuneSpec{train});
    }
    case v1::Step::kOptimize: return engine::StepSpec(engine::OptimizeSpec{});
    case v1::Step::kAnalyze: return ConvertAnalyze(step.analyze(), at + ".analyze");
    case v1::Step::kAuto: return ConvertAuto(step.auto_(), at + ".auto");
    case v1::Step::KIND_NOT_SET:
      return InvalidArgument(at +
                             " is empty: a step needs one of prune, quantize, distill, factorize, finetune, "
                             "optimize, analyze, auto");
  }
  return InvalidArgument(at + ": unknown step");
}

}  // namespace

namespace {

// A protobuf path ("steps[0].auto.max_accuracy_drop") in the recipe's JSON names
// ("steps[0].auto.maxAccuracyDrop"), and the message type it ends at (null past a scalar or an
// unknown name).
std::pair<std::string, const google::protobuf::Descriptor*> JsonPath(const std::string& path) {
  const google::protobuf::Descriptor* d = v1::Recipe::descriptor();
  std::string out;
  std::stringstream parts(path);
  for (std::string part; std::getline(parts, part, '.');) {
    const auto bracket = part.find('[');
    const std::string name = part.substr(0, bracket);
    const std::string index = bracket == std::string::npos ? "" : part.substr(bracket);
    const google::protobuf::FieldDescriptor* f = nullptr;
    for (int i = 0; d && i < d->field_count() && !f; ++i)
      if (d->field(i)->json_name() == name || d->field(i)->name() == name) f = d->field(i);
    out += (out.empty() ? "" : ".") + (f ? f->json_name() : name) + index;
    d = f ? f->message_type() : nullptr;
  }
  return {out, d};
}

// Protobuf's JSON errors in the recipe's terms, or "" to keep protobuf's words:
//  "(steps[0].prune) chanel: Cannot find field." -> "recipe.steps[0].prune has no field 'chanel'
//    (it has: magnitude, channel, nm)";
//  "(steps[0].auto.max_accuracy_drop): invalid value "one" for type TYPE_FLOAT" ->
//    "recipe.steps[0].auto.maxAccuracyDrop: invalid value "one": a number is expected";
//  "(steps[0]): invalid value oneof field 'kind' is already set. Cannot set 'quantize' ..." ->
//    "recipe.steps[0] names two kinds of step ...".
std::string RecipeParseMessage(const std::string& message) {
  std::string path, rest = message;
  if (!rest.empty() && rest[0] == '(') {
    const auto close = rest.find(')');
    if (close == std::string::npos) return "";
    path = rest.substr(1, close - 1);
    rest = rest.substr(close + 1);
    if (!rest.empty() && rest[0] == ':') rest = rest.substr(1);
    if (!rest.empty() && rest[0] == ' ') rest = rest.substr(1);
  }
  static const std::string kUnknown = ": Cannot find field.";
  if (rest.size() > kUnknown.size() &&
      rest.compare(rest.size() - kUnknown.size(), kUnknown.size(), kUnknown) == 0) {
    const std::string name = rest.substr(0, rest.size() - kUnknown.size());
    const auto [where, d] = JsonPath(path);
    if (!d) return "";
    std::string fields;
    for (int i = 0; i < d->field_count(); ++i) fields += (i ? ", " : "") + d->field(i)->json_name();
    return "recipe" + (where.empty() ? "" : "." + where) + " has no field '" + name + "' (it has: " + fields +
           ")";
  }
  const std::string where = "recipe" + (path.empty() ? "" : "." + JsonPath(path).first);
  static const std::string kOneof = "invalid value oneof field 'kind' is already set. Cannot set '";
  if (rest.rfind(kOneof, 0) == 0) {
    const std::string second = rest.substr(kOneof.size(), rest.find('\'', kOneof.size()) - kOneof.size());
    std::string kinds;  // the Step message's oneof, as the recipe's JSON names them
    const google::protobuf::OneofDescriptor* kind = v1::Step::descriptor()->FindOneofByName("kind");
    for (int i = 0; kind && i < kind->field_count(); ++i)
      kinds += (i ? ", " : "") + kind->field(i)->json_name();
    return where + " names two kinds of step (the second is '" + second + "'): a step is one of " + kinds +
           "; give each its own step";
  }
  static const std::string kInvalid = "invalid value ";
  const auto type_at = rest.rfind(" for type TYPE_");
  if (rest.rfind(kInvalid, 0) == 0 && type_at != std::string::npos) {
    const std::string value = rest.substr(kInvalid.size(), type_at - kInvalid.size());
    const std::string type = rest.substr(type_at + 15);
    const std::string expected = type == "FLOAT" || type == "DOUBLE"     ? "a number"
                                 : type.find("INT") != std::string::npos ? "a whole number"
                                 : type == "BOOL"                        ? "true or false"
                                 : type == "STRING"                      ? "a string"
                                                                         : "";
    if (expected.empty()) return "";
    return where + ": invalid value " + value + ": " + expected + " is expected";
  }
  return "";
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
  if (!st.ok()) {
    const std::string unknown = RecipeParseMessage(std::string(st.message()));
    return InvalidArgument(unknown.empty() ? "recipe: " + std::string(st.message()) : unknown);
  }
  return recipe;
}

Result<std::vector<engine::StepSpec>> ToEngineSteps(const v1::Recipe& recipe) {
  if (recipe.steps_size() == 0) return InvalidArgument("recipe.steps is empty: give at least one step");
  if (recipe.steps_size() > 32) return InvalidArgument("recipe.steps has more than 32 steps");
  std::vector<engine::StepSpec> out;
  for (int i = 0; i < recipe.steps_size(); ++i) {
    PARE_ASSIGN_OR_RETURN(auto r, Convert(recipe.steps(i), "steps[" + std::to_string(i) + "]"));
    if (std::holds_alternative<engine::AutoSpec>(r) && recipe.steps_size() > 1) {
      return InvalidArgument("steps[" + std::to_string(i) +
                             "].auto must be the recipe's only step: it searches the whole recipe itself");
    }
    if (std::holds_alternative<engine::OptimizeSpec>(r)) {
      for (size_t j = 0; j < out.size(); ++j) {
        if (std::holds_alternative<engine::StaticQuantSpec>(out[j]) ||
            std::holds_alternative<engine::DynamicQuantSpec>(out[j])) {
          return InvalidArgument("steps[" + std::to_string(i) + "].optimize after steps[" +
                                 std::to_string(j) + "] (" + engine::StepName(out[j]) +
                                 "): a quantized model is frozen already; optimize a float model");
        }
      }
    }
    if (!out.empty() && std::holds_alternative<engine::OptimizeSpec>(out.back())) {
      return InvalidArgument(
          "steps[" + std::to_string(i - 1) +
          "].optimize must be the last step: a frozen model cannot be pruned, quantized or "
          "trained further");
    }
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<ModelReference> ReferencedModels(const v1::Recipe& recipe) {
  std::vector<ModelReference> out;
  for (int i = 0; i < recipe.steps_size(); ++i) {
    const auto& step = recipe.steps(i);
    if (!step.has_distill()) continue;
    const std::string at = "recipe.steps[" + std::to_string(i) + "].distill.";
    for (const auto& [field, id] :
         {std::pair<const char*, std::string>{"teacherModel", step.distill().teacher_model()},
          {"studentModel", step.distill().student_model()}}) {
      if (!id.empty()) out.push_back({at + field, id});
    }
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
    case v1::Step::kOptimize: return "optimize";
    case v1::Step::kAnalyze: return "analyze";
    case v1::Step::kAuto: return "auto";
    case v1::Step::kFinetune: return "finetune";
    default: return "none";
  }
}

}  // namespace pare
