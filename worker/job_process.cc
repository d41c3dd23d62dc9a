#include <signal.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/sha256.h"
#include "worker/engine/engine.h"
#include "worker/engine/error.h"
#include "worker/recipe_convert.h"
#include "worker/torch_info.h"
#include "worker/worker.h"
#include "worker/worker_internal.h"

namespace pare::worker {
namespace {

namespace fs = std::filesystem;

std::atomic<bool> g_child_stop{false};
void OnChildStop(int) { g_child_stop = true; }

}  // namespace

v1::StepReport ToProto(const engine::StepReport& s) {
  v1::StepReport p;
  p.set_step(s.step);
  p.set_wall_seconds(s.wall_seconds);
  for (const auto& n : s.notes) p.add_notes(n);
  auto* m = p.mutable_stats();
  m->set_size_bytes(s.stats.size_bytes);
  m->set_deflated_bytes(s.stats.deflated_bytes);
  m->set_parameters(s.stats.parameters);
  m->set_nonzero_parameters(s.stats.nonzero_parameters);
  for (const auto& l : s.stats.latency) {
    if (l.batch == 1) {
      m->set_latency_p50_ms(l.p50_ms);
      m->set_latency_p95_ms(l.p95_ms);
    }
  }
  m->set_macs(s.stats.macs.value_or(0));
  m->set_top1_agreement(s.stats.top1_agreement);
  m->set_output_cosine(s.stats.output_cosine);
  m->set_output_centred_cosine(s.stats.output_centred_cosine);
  if (s.stats.top1_accuracy) {
    m->set_has_accuracy(true);
    m->set_top1_accuracy(*s.stats.top1_accuracy);
    m->set_top5_accuracy(s.stats.top5_accuracy.value_or(0));
  }
  return p;
}

bool OutOfMemory(const std::string& message) {
  return message.find("can't allocate memory") != std::string::npos ||
         message.find("not enough memory") != std::string::npos ||
         message.find("std::bad_alloc") != std::string::npos ||
         message.find("out of memory") != std::string::npos;
}

namespace {

// The engine's progress as JSON lines on stdout, for the worker; stops when the worker says so.
// Test hook: while the file PARE_TEST_HOLD_JOB names exists, the job waits in its progress
// callback once it has reported some progress (so it is RUNNING with progress > 0, and still
// stops when told to): a test acts on a running job in a known state instead of racing it.
// With PARE_TEST_HOLD_AT too, it holds only once a progress message holding that text was
// reported (e.g. "trial 2": an auto search that has checkpointed its first trial).
engine::ProgressFn ProgressPrinter() {
  const char* hold = std::getenv("PARE_TEST_HOLD_JOB");
  const char* at = std::getenv("PARE_TEST_HOLD_AT");
  return [hold, at, reported = false](const engine::ProgressUpdate& u) mutable {
    if (u.fraction >= 0) {
      nlohmann::json line = {{"index", u.step_index},
                             {"count", u.step_count},
                             {"step", u.step},
                             {"fraction", u.fraction},
                             {"message", u.message}};
      std::cout << line.dump() << std::endl;
      reported = reported || (at ? u.message.find(at) != std::string::npos : u.fraction > 0);
    }
    while (hold && reported && !g_child_stop && fs::exists(hold)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return !g_child_stop;
  };
}

// The engine's options for the job: the model's input shapes, the measurement settings and the
// files the worker fetched (spec.json), progress printed for the worker.
engine::CompressOptions OptionsFor(const v1::LeasedJob& job, const nlohmann::json& spec) {
  engine::CompressOptions opts;
  opts.device = job.device();
  opts.input_shape.assign(job.input_shape().begin(), job.input_shape().end());
  for (const auto& more : job.more_input_shapes())
    opts.more_input_shapes.emplace_back(more.dims().begin(), more.dims().end());
  opts.latency_batches = spec["latency_batches"].get<std::vector<int>>();
  opts.latency_budget_seconds = spec["latency_budget"];
  opts.latency_cache_dir = spec.value("latency_cache_dir", "");
  opts.model_digest = spec.value("model_digest", "");
  if (spec.contains("datasets")) {
    for (const auto& [role, d] : spec["datasets"].items()) {
      engine::DatasetInput input{d["format"], d["path"]};
      if (role == "calibration") opts.calibration = input;
      if (role == "train") opts.train = input;
      if (role == "eval") opts.eval = input;
    }
  }
  if (spec.contains("models")) {
    for (const auto& [id, path] : spec["models"].items()) opts.models[id] = path;
  }
  opts.progress = ProgressPrinter();
  // An auto search's finished trials: checkpointed (a line for the worker, which sends it on)
  // and, from an earlier attempt's checkpoint, not run again.
  if (!job.checkpoint_json().empty()) {
    auto resume = nlohmann::json::parse(job.checkpoint_json(), nullptr, /*allow_exceptions=*/false);
    if (resume.is_array()) opts.resume_trials = resume;
  }
  opts.checkpoint = [](const nlohmann::json& trials) {
    std::cout << nlohmann::json{{"checkpoint", trials}}.dump() << std::endl;
  };
  return opts;
}

}  // namespace

int RunJobChild(const std::string& dir) {
  struct sigaction sa {};
  sa.sa_handler = OnChildStop;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  v1::CompleteHeader header;
  nlohmann::json spec;
  v1::LeasedJob job;
  try {
    std::ifstream in(dir + "/spec.json");
    spec = nlohmann::json::parse(in);
    std::ifstream pb(dir + "/job.pb", std::ios::binary);
    if (!job.ParseFromIstream(&pb)) throw std::runtime_error("job.pb is unreadable");
  } catch (const std::exception& e) {
    std::cerr << "pare-worker --run-job: " << e.what() << "\n";
    return 2;
  }
  const std::string result_path = spec["result"];
  try {
    engine::InitProcess(spec.value("threads", 0), spec.value("quantized_engine", ""),
                        spec.value("cpu_share", 1));
    auto steps = ToEngineSteps(job.recipe());
    if (!steps.ok())
      throw engine::EngineError(steps.status().code(), engine::kReasonBadRecipe, steps.status().message());
    engine::CompressOptions opts = OptionsFor(job, spec);
    engine::Report report = engine::Compress(spec["model"], steps.value(), opts, result_path);
    nlohmann::json j = engine::ToJson(report);
    j["job_id"] = job.job_id();
    j["worker"] = spec.value("worker", "");
    j["libtorch"] = LibTorchVersion();
    j["device_name"] = spec.value("device_name", "");
    header.set_state(v1::SUCCEEDED);
    if (report.failure) {
      // Failed with a model and a report worth keeping (auto's closest candidate).
      SetJobError(header, v1::FAILED, report.failure->code, report.failure->reason, report.failure->message);
    }
    header.set_report_json(j.dump(2));
    for (const auto& s : report.steps) *header.add_reports() = ToProto(s);
    header.set_result_size_bytes(fs::file_size(result_path));
    header.set_result_sha256(Sha256OfFile(result_path));
  } catch (const engine::Cancelled&) {
    return 3;
  } catch (const engine::EngineError& e) {
    SetJobError(header, v1::FAILED, CodeName(e.code()), e.reason(), e.what());
  } catch (const std::exception& e) {
    SetJobError(header, v1::FAILED, "INTERNAL", "ENGINE", e.what());
  }
  if (header.state() == v1::FAILED && OutOfMemory(header.error().message())) {
    SetJobError(
        header, v1::FAILED, "RESOURCE_EXHAUSTED", kReasonMemoryLimit,
        "the job ran out of memory (the worker's limit or the machine's): " + header.error().message());
  }
  std::ofstream out(dir + "/outcome.pb", std::ios::binary);
  if (!header.SerializeToOstream(&out)) return 2;
  out.close();
  return out ? 0 : 2;  // the worker reports a child that could not say how it ended
}

}  // namespace pare::worker
