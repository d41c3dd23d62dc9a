#include "client/compress_verb.h"

#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>

#include "client/cli.h"
#include "common/cli_checks.h"
#include "common/sha256.h"
#include "worker/engine/engine.h"
#include "worker/engine/error.h"
#include "worker/recipe_convert.h"

namespace pare::cli {
namespace {

namespace fs = std::filesystem;

// The engine's options from the command line; a usage error names the flag at fault.
Result<engine::CompressOptions> CompressOptionsFrom(const CompressArgs& a) {
  engine::CompressOptions opts;
  // One --input-shape per tensor input of forward; the first is the job's input shape.
  for (size_t i = 0; i < a.shapes.size(); ++i) {
    std::vector<int64_t> dims;
    PARE_RETURN_IF_ERROR(ParseShape(a.shapes[i], &dims));
    if (i == 0)
      opts.input_shape = dims;
    else
      opts.more_input_shapes.push_back(dims);
  }
  // Where the result goes is checked before any work, not after it.
  const fs::path out_dir = fs::absolute(a.out).parent_path();
  if (!fs::is_directory(out_dir)) {
    return InvalidArgument("-o " + a.out + ": the folder " + out_dir.string() + " does not exist");
  }
  for (const auto& [flag, file] :
       {std::pair<const char*, std::string>{"--report", a.report}, {"--report-html", a.report_html}}) {
    if (file.empty()) continue;
    const fs::path dir = fs::absolute(file).parent_path();
    if (!fs::is_directory(dir)) {
      return InvalidArgument(std::string(flag) + " " + file + ": the folder " + dir.string() +
                             " does not exist");
    }
  }
  opts.device = a.device;
  if (!a.latency_cache.empty()) {
    opts.latency_cache_dir = a.latency_cache;
    opts.model_digest = Sha256OfFile(a.model);
  }
  opts.latency_budget_seconds = a.latency_budget;
  opts.latency_batches = a.latency_batches;
  if (auto problem = LatencyBatchesProblem(a.latency_batches); !problem.empty())
    return InvalidArgument(problem);
  for (const auto& m : a.extra_models) {
    auto eq = m.find('=');
    if (eq == std::string::npos || eq == 0 || !fs::is_regular_file(m.substr(eq + 1))) {
      return InvalidArgument("--model takes ID=FILE with an existing file, got '" + m + "'");
    }
    opts.models[m.substr(0, eq)] = m.substr(eq + 1);
  }
  if (!a.calibration.empty()) opts.calibration = engine::DatasetInput{a.format, a.calibration};
  if (!a.train.empty()) opts.train = engine::DatasetInput{a.format, a.train};
  if (!a.eval.empty()) opts.eval = engine::DatasetInput{a.format, a.eval};
  return opts;
}

// One line per step, then its notes; warnings stand out.
void PrintSteps(const engine::Report& report) {
  for (const auto& s : report.steps) {
    std::cout << std::left << std::setw(18) << s.step << std::right << " size " << s.stats.size_bytes
              << " deflated " << s.stats.deflated_bytes << " params " << s.stats.parameters << " nonzero "
              << s.stats.nonzero_parameters << " p50";
    // Each batch size timed, labelled (the first need not be batch 1).
    if (s.stats.latency.empty()) std::cout << " -";
    for (size_t k = 0; k < s.stats.latency.size(); ++k) {
      const auto& l = s.stats.latency[k];
      std::cout << (k ? ", " : " ") << std::fixed << std::setprecision(2) << l.p50_ms << " ms (b" << l.batch
                << ")";
    }
    std::cout << " agree " << std::fixed << std::setprecision(3) << s.stats.top1_agreement << " centred "
              << s.stats.output_centred_cosine;
    if (s.stats.top1_accuracy) std::cout << " top-1 " << *s.stats.top1_accuracy;
    std::cout << "\n";
    for (const auto& n : s.notes)
      std::cout << "    " << (n.rfind("WARNING", 0) == 0 ? "! " : "- ") << n << "\n";
  }
}

// An auto step's trials, one line each, the chosen one marked.
void PrintSearch(const nlohmann::json& search) {
  if (search.is_null()) return;
  std::cout << "search: " << search.value("metric", "") << "; goal: at most "
            << search["goal"].value("points", 0.0) << " points lost, objective "
            << search["goal"].value("objective", "") << "\n";
  const int chosen = search.value("chosen", -1);
  for (const auto& t : search.value("trials", nlohmann::json::array())) {
    const int i = t.value("index", 0);
    std::cout << (i == chosen ? "  * " : "    ") << std::setw(2) << i << " " << t.value("name", "");
    if (t.contains("error")) {
      std::cout << ": failed: " << t.value("error", "") << "\n";
      continue;
    }
    std::cout << std::fixed << std::setprecision(2) << ": drop " << t.value("drop", 0.0) << ", "
              << t.value("ratio", 0.0) << "x"
              << (i == 0                         ? ""
                  : t.value("meets_goal", false) ? ""
                                                 : " (not within the goal)")
              << (t.value("resumed", false) ? " [from the checkpoint]" : "") << "\n";
  }
  if (search.contains("why")) std::cout << "  " << search.value("why", "") << "\n";
}

}  // namespace

int Compress(const CompressArgs& a) {
  std::string text;
  Status st = ReadFile(a.recipe, &text);
  if (!st.ok()) return Fail(st, "reading the recipe");
  auto recipe = ParseRecipeJson(text);
  if (!recipe.ok()) return Fail(recipe.status(), a.recipe);
  auto steps = ToEngineSteps(recipe.value());
  if (!steps.ok()) return Fail(steps.status(), a.recipe);
  auto options = CompressOptionsFrom(a);
  if (!options.ok()) {
    Fail(options.status(), "usage");
    return kExitUsage;
  }
  engine::CompressOptions opts = std::move(options.value());
  ProgressView view;
  v1::Job shown;
  shown.set_id("compress");
  shown.set_state(v1::RUNNING);
  opts.progress = [&](const engine::ProgressUpdate& u) {
    if (u.fraction >= 0 && !g_json) {
      shown.mutable_progress()->set_fraction(static_cast<float>(u.fraction));
      shown.mutable_progress()->set_step(u.step);
      shown.mutable_progress()->set_step_index(u.step_index);
      shown.mutable_progress()->set_step_count(u.step_count);
      shown.mutable_progress()->set_message(u.message);
      view.Update(shown);
    }
    return true;
  };
  try {
    engine::InitProcess(a.threads);
    auto report = engine::Compress(a.model, steps.value(), opts, a.out);
    view.Done();
    std::string json = engine::ToJson(report).dump(2);
    if (!a.report.empty()) std::ofstream(a.report) << json << "\n";
    if (!a.report_html.empty()) {
      Status html = WriteReportHtml(json, fs::path(a.model).filename().string(), a.report_html);
      if (!html.ok()) return Fail(html, "--report-html");
    }
    if (g_json) {
      std::cout << json << "\n";
    } else {
      PrintSteps(report);
      PrintSearch(report.search);
      std::cout << "wrote " << a.out << (report.failure ? " (the closest candidate)" : "") << "\n";
    }
    if (report.failure) {
      std::cerr << "pare: compress: " << report.failure->reason << ": " << report.failure->message << "\n";
      return kExitJobFailed;
    }
    return kExitOk;
  } catch (const engine::EngineError& e) {
    view.Done();
    std::cerr << "pare: compress: " << e.reason() << ": " << e.what() << "\n";
    return kExitJobFailed;
  }
}

// `pare compress`: a recipe run offline, its arguments filled into `ca`.
CLI::App* AddCompressVerb(CLI::App& app, CompressArgs& ca) {
  CLI::App* compress = app.add_subcommand("compress", "run a recipe offline, without a server");
  compress->add_option("MODEL", ca.model, "the TorchScript model")->required()->check(CLI::ExistingFile);
  compress->add_option("--recipe", ca.recipe, "recipe JSON file")->required()->check(CLI::ExistingFile);
  compress->add_option("-o,--output", ca.out, "where to write the result")->required();
  compress->add_option("--report", ca.report, "write the JSON report here");
  compress->add_option("--report-html", ca.report_html,
                       "write the report as one self-contained HTML page here");
  compress->add_option("--calibration", ca.calibration, "calibration data file");
  compress->add_option("--train", ca.train, "training data file");
  compress->add_option("--eval", ca.eval, "evaluation data file");
  compress
      ->add_option("--format", ca.format, "format of the data files: tensors, idx or image-folder (a folder)")
      ->capture_default_str();
  compress->add_option(
      "--input-shape", ca.shapes,
      "input shape, e.g. 1,3,224,224; repeat it for a model whose forward takes several tensors");
  compress->add_option("--device", ca.device, "cpu, cuda or auto")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  compress
      ->add_option("--threads", ca.threads,
                   "intra-op threads (0: the CPUs this process may use: affinity mask and cgroup CPU quota)")
      ->check(CLI::Range(0, 4096));
  compress->add_option("--model", ca.extra_models,
                       "ID=FILE: a model the recipe names (distill teacherModel/studentModel), repeatable");
  compress
      ->add_option(
          "--latency-budget", ca.latency_budget,
          "seconds the job spends timing models, warm-up included, shared by the original, each step's "
          "result and each batch size (each at least 3 timed runs); an auto step times each trial with all "
          "of it")
      ->capture_default_str()
      ->check(NumberIn(0, 600));
  compress
      ->add_option("--latency-batches", ca.latency_batches,
                   "batch sizes to time, e.g. 1,32 (default: 1; 1 and 32 on a GPU)")
      ->delimiter(',');
  compress->add_option(
      "--latency-cache", ca.latency_cache,
      "a folder where the original model's latency is kept: a model timed before on this host with "
      "the same settings is not timed again (the report says so)");
  return compress;
}

}  // namespace pare::cli
