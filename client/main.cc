// pare: the command-line client. Verbs talk to pare-server over gRPC, except `compress`,
// which runs the same engine offline. Exit codes: 0 success, 1 job FAILED/CANCELLED,
// 2 usage, 3 server unreachable or deadline exceeded, 4 rejected by the server.
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "client/client.h"
#include "client/tar_pack.h"
#include "common/sha256.h"
#include "worker/engine/engine.h"
#include "worker/engine/error.h"
#include "worker/recipe_convert.h"

namespace {

namespace fs = std::filesystem;
using pare::Code;
using pare::Status;

constexpr int kExitOk = 0, kExitJobFailed = 1, kExitUsage = 2, kExitUnreachable = 3, kExitRejected = 4;

bool g_json = false;

int ExitFor(const Status& s) {
  if (s.ok()) return kExitOk;
  if (s.code() == Code::kUnavailable || s.code() == Code::kDeadlineExceeded) return kExitUnreachable;
  return kExitRejected;
}

int Fail(const Status& s, const std::string& what) {
  std::cerr << "pare: " << what << ": " << pare::CodeName(s.code()) << ": " << s.message() << "\n";
  if (s.code() == Code::kUnavailable)
    std::cerr << "pare: is pare-server running? (--server or $PARE_SERVER)\n";
  return ExitFor(s);
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

Status ParseShape(const std::string& text, std::vector<int64_t>* out) {
  out->clear();
  if (text.empty()) return Status::Ok();
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) {
    try {
      size_t used = 0;
      long long v = std::stoll(part, &used);
      if (used != part.size() || v <= 0) throw std::invalid_argument(part);
      out->push_back(v);
    } catch (const std::exception&) {
      return pare::InvalidArgument(
          "--input-shape must be positive integers separated by commas, e.g. 1,3,224,224");
    }
  }
  return Status::Ok();
}

Status ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return pare::InvalidArgument("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return Status::Ok();
}

const std::string& StateName(pare::v1::JobState s) { return pare::v1::JobState_Name(s); }

// Progress on a terminal: one rewritten line; otherwise a line per change.
class ProgressView {
 public:
  ProgressView() : tty_(::isatty(STDERR_FILENO)) {}
  void Update(const pare::v1::Job& j) {
    const auto& p = j.progress();
    std::ostringstream line;
    line << j.id() << " " << StateName(j.state());
    if (j.state() == pare::v1::RUNNING) {
      int width = 30, filled = static_cast<int>(p.fraction() * width + 0.5);
      if (tty_) line << " [" << std::string(filled, '#') << std::string(width - filled, '.') << "]";
      line << " " << std::setw(3) << static_cast<int>(p.fraction() * 100) << "%";
      if (!p.step().empty()) line << " step " << p.step_index() << "/" << p.step_count() << " " << p.step();
      if (!p.message().empty()) line << ": " << p.message();
    }
    if (j.attempts() > 1) line << " (attempt " << j.attempts() << ")";
    std::string text = line.str();
    if (tty_) {
      std::cerr << "\r" << text << std::string(last_len_ > text.size() ? last_len_ - text.size() : 0, ' ')
                << std::flush;
      last_len_ = text.size();
    } else {
      // Logs get a line when the state or step changes, else at most one every 5 s.
      std::string key = StateName(j.state()) + std::string(" ") + p.step();
      auto now = std::chrono::steady_clock::now();
      if (key != last_key_ || now - last_print_ > std::chrono::seconds(5)) {
        std::cerr << text << "\n";
        last_key_ = key;
        last_print_ = now;
      }
    }
    last_ = text;
  }
  void Done() {
    if (tty_ && last_len_) std::cerr << "\n";
  }

 private:
  bool tty_;
  size_t last_len_ = 0;
  std::string last_;
  std::string last_key_;
  std::chrono::steady_clock::time_point last_print_;
};

void PrintJobSummary(const pare::v1::Job& j) {
  std::cout << "job " << j.id() << " " << StateName(j.state()) << " attempts=" << j.attempts() << "\n";
  if (j.has_error() && !j.error().code().empty()) {
    std::cout << "error " << j.error().code() << " " << j.error().reason() << ": " << j.error().message()
              << "\n";
  }
  if (j.reports_size() > 0) {
    std::cout << std::left << std::setw(18) << "step" << std::right << std::setw(12) << "size"
              << std::setw(12) << "deflated" << std::setw(12) << "params" << std::setw(12) << "nonzero"
              << std::setw(9) << "GMACs" << std::setw(10) << "p50 ms" << std::setw(10) << "agree"
              << std::setw(9) << "cosine" << std::setw(9) << "centred" << std::setw(8) << "top1"
              << "\n";
    for (const auto& r : j.reports()) {
      const auto& s = r.stats();
      std::cout << std::left << std::setw(18) << r.step() << std::right << std::setw(12) << s.size_bytes()
                << std::setw(12) << s.deflated_bytes() << std::setw(12) << s.parameters() << std::setw(12)
                << s.nonzero_parameters() << std::setw(9) << std::fixed << std::setprecision(3)
                << s.macs() / 1e9 << std::setw(10) << std::setprecision(2) << s.latency_p50_ms()
                << std::setw(10) << std::setprecision(3) << s.top1_agreement() << std::setw(9)
                << std::setprecision(4) << s.output_cosine() << std::setw(9) << s.output_centred_cosine()
                << std::setw(8);
      if (s.has_accuracy())
        std::cout << std::setprecision(3) << s.top1_accuracy();
      else
        std::cout << "-";
      std::cout << "\n";
    }
  }
}

int WaitFor(pare::client::Client& c, const std::string& id) {
  ProgressView view;
  auto job = c.Watch(id, [&](const pare::v1::Job& j) {
    if (!g_json) view.Update(j);
  });
  view.Done();
  if (!job.ok()) return Fail(job.status(), "watching job " + id);
  if (g_json)
    std::cout << ToJson(job.value()) << "\n";
  else
    PrintJobSummary(job.value());
  return job->state() == pare::v1::SUCCEEDED ? kExitOk : kExitJobFailed;
}

// `pare compress`: what its command line gave.
struct CompressArgs {
  std::string model, recipe, out, report;
  std::string calibration, train, eval, format = "tensors";
  std::vector<std::string> shapes;  // one --input-shape per input of forward
  std::string device = "auto";
  int threads = 0;
  double latency_budget = 1.0;
  std::vector<int> latency_batches;
  std::string latency_cache;              // empty: the original is timed every time
  std::vector<std::string> extra_models;  // ID=FILE
};

int Compress(const CompressArgs& a) {
  std::string text;
  Status st = ReadFile(a.recipe, &text);
  if (!st.ok()) return Fail(st, "reading the recipe");
  auto recipe = pare::ParseRecipeJson(text);
  if (!recipe.ok()) return Fail(recipe.status(), a.recipe);
  auto steps = pare::ToEngineSteps(recipe.value());
  if (!steps.ok()) return Fail(steps.status(), a.recipe);
  pare::engine::CompressOptions opts;
  // One --input-shape per tensor input of forward; the first is the job's input shape.
  for (size_t i = 0; i < a.shapes.size(); ++i) {
    std::vector<int64_t> dims;
    st = ParseShape(a.shapes[i], &dims);
    if (!st.ok()) {
      Fail(st, "usage");
      return kExitUsage;
    }
    if (i == 0)
      opts.input_shape = dims;
    else
      opts.more_input_shapes.push_back(dims);
  }
  // Where the result goes is checked before any work, not after it.
  const fs::path out_dir = fs::absolute(a.out).parent_path();
  if (!fs::is_directory(out_dir)) {
    Fail(pare::InvalidArgument("-o " + a.out + ": the folder " + out_dir.string() + " does not exist"),
         "usage");
    return kExitUsage;
  }
  opts.device = a.device;
  if (!a.latency_cache.empty()) {
    opts.latency_cache_dir = a.latency_cache;
    opts.model_digest = pare::Sha256OfFile(a.model);
  }
  opts.latency_budget_seconds = a.latency_budget;
  opts.latency_batches = a.latency_batches;
  for (int b : a.latency_batches) {
    if (b < 1 || b > 4096) {
      Fail(pare::InvalidArgument("--latency-batches: batch size " + std::to_string(b) + " is not in 1..4096"),
           "usage");
      return kExitUsage;
    }
  }
  for (const auto& m : a.extra_models) {
    auto eq = m.find('=');
    if (eq == std::string::npos || eq == 0 || !fs::is_regular_file(m.substr(eq + 1))) {
      Fail(pare::InvalidArgument("--model takes ID=FILE with an existing file, got '" + m + "'"), "usage");
      return kExitUsage;
    }
    opts.models[m.substr(0, eq)] = m.substr(eq + 1);
  }
  if (!a.calibration.empty()) opts.calibration = pare::engine::DatasetInput{a.format, a.calibration};
  if (!a.train.empty()) opts.train = pare::engine::DatasetInput{a.format, a.train};
  if (!a.eval.empty()) opts.eval = pare::engine::DatasetInput{a.format, a.eval};
  ProgressView view;
  pare::v1::Job shown;
  shown.set_id("compress");
  shown.set_state(pare::v1::RUNNING);
  opts.progress = [&](const pare::engine::ProgressUpdate& u) {
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
    pare::engine::InitProcess(a.threads);
    auto report = pare::engine::Compress(a.model, steps.value(), opts, a.out);
    view.Done();
    std::string json = pare::engine::ToJson(report).dump(2);
    if (!a.report.empty()) {
      std::ofstream(a.report) << json << "\n";
    }
    if (g_json) {
      std::cout << json << "\n";
    } else {
      // One line per step, then its notes; warnings stand out.
      for (const auto& s : report.steps) {
        double p50 = s.stats.latency.empty() ? 0 : s.stats.latency[0].p50_ms;
        std::cout << std::left << std::setw(18) << s.step << std::right << " size " << s.stats.size_bytes
                  << " deflated " << s.stats.deflated_bytes << " params " << s.stats.parameters << " nonzero "
                  << s.stats.nonzero_parameters << " p50 " << std::fixed << std::setprecision(2) << p50
                  << " ms agree " << std::setprecision(3) << s.stats.top1_agreement << " centred "
                  << s.stats.output_centred_cosine;
        if (s.stats.top1_accuracy) std::cout << " top-1 " << *s.stats.top1_accuracy;
        std::cout << "\n";
        for (const auto& n : s.notes)
          std::cout << "    " << (n.rfind("WARNING", 0) == 0 ? "! " : "- ") << n << "\n";
      }
      std::cout << "wrote " << a.out << "\n";
    }
    return kExitOk;
  } catch (const pare::engine::EngineError& e) {
    view.Done();
    std::cerr << "pare: compress: " << e.reason() << ": " << e.what() << "\n";
    return kExitJobFailed;
  }
}

}  // namespace

// What a verb created (a model, a dataset, a job): its JSON with --json, else its id.
template <typename M>
int PrintCreated(const M& m) {
  if (g_json) {
    std::cout << ToJson(m) << "\n";
  } else {
    std::cout << m.id() << "\n";
  }
  return kExitOk;
}

// What the server verbs' command lines gave (pare compress has CompressArgs).
struct VerbArgs {
  std::string file, name, format, labels, model_id, recipe, calib, train, eval, device = "auto", request_id,
                                                                                job_id, out, report;
  bool wait = false;
  int page_size = 50;
  std::vector<std::string> upload_shapes;  // upload-model: one --input-shape per input
  uint32_t job_timeout = 0;
};

int UploadModelVerb(pare::client::Client& c, const VerbArgs& a) {
  std::vector<int64_t> dims;
  std::vector<std::vector<int64_t>> more;
  for (size_t i = 0; i < a.upload_shapes.size(); ++i) {
    std::vector<int64_t> d;
    Status st = ParseShape(a.upload_shapes[i], &d);
    if (!st.ok()) {
      Fail(st, "usage");
      return kExitUsage;
    }
    if (i == 0)
      dims = d;
    else
      more.push_back(d);
  }
  auto m = c.UploadModel(a.file, a.name, dims, nullptr, more);
  if (!m.ok()) return Fail(m.status(), "upload-model " + a.file);
  return PrintCreated(m.value());
}

int UploadDatasetVerb(pare::client::Client& c, const VerbArgs& a) {
  std::string path = a.file;
  std::string tmp;
  if (!a.labels.empty()) {
    if (a.format != "idx") {
      Fail(pare::InvalidArgument("--labels goes with --format idx"), "usage");
      return kExitUsage;
    }
    tmp = (fs::temp_directory_path() / ("pare-idx-" + std::to_string(::getpid()) + ".tar")).string();
    Status st = pare::client::PackIdxPair(a.file, a.labels, tmp);
    if (!st.ok()) return Fail(st, "packing the idx files");
    path = tmp;
  } else if (a.format == "image-folder" && fs::is_directory(a.file)) {
    tmp = (fs::temp_directory_path() / ("pare-images-" + std::to_string(::getpid()) + ".tar")).string();
    Status st = pare::client::PackImageFolder(a.file, tmp);
    if (!st.ok()) return Fail(st, "packing the image folder");
    path = tmp;
  }
  auto d = c.UploadDataset(path, a.format, a.name.empty() ? fs::path(a.file).filename().string() : a.name);
  if (!tmp.empty()) fs::remove(tmp);
  if (!d.ok()) return Fail(d.status(), "upload-dataset " + a.file);
  return PrintCreated(d.value());
}

int SubmitVerb(pare::client::Client& c, const VerbArgs& a) {
  std::string text;
  Status st = ReadFile(a.recipe, &text);
  if (!st.ok()) {
    Fail(st, "reading the recipe");
    return kExitUsage;
  }
  auto parsed = pare::ParseRecipeJson(text);
  if (!parsed.ok()) {
    std::cerr << "pare: " << a.recipe << ": " << parsed.status().message() << "\n";
    return kExitUsage;
  }
  pare::v1::SubmitJobRequest req;
  req.set_model_id(a.model_id);
  *req.mutable_recipe() = parsed.value();
  req.set_calibration_dataset_id(a.calib);
  req.set_train_dataset_id(a.train);
  req.set_eval_dataset_id(a.eval);
  req.set_device(a.device);
  req.set_request_id(a.request_id);
  req.set_timeout_seconds(a.job_timeout);
  auto job = c.Submit(req);
  if (!job.ok()) return Fail(job.status(), "submit");
  if (!a.wait) return PrintCreated(job.value());
  if (!g_json) std::cout << job->id() << std::endl;
  return WaitFor(c, job->id());
}

int StatusVerb(pare::client::Client& c, const VerbArgs& a) {
  auto job = c.GetJob(a.job_id);
  if (!job.ok()) return Fail(job.status(), "status " + a.job_id);
  if (g_json)
    std::cout << ToJson(job.value()) << "\n";
  else
    PrintJobSummary(job.value());
  return kExitOk;
}

int ListVerb(pare::client::Client& c, const VerbArgs& a) {
  std::string token;
  pare::v1::ListJobsResponse all;
  do {
    auto page = c.ListJobs(a.page_size, token);
    if (!page.ok()) return Fail(page.status(), "list");
    for (const auto& j : page->jobs()) *all.add_jobs() = j;
    token = page->next_page_token();
  } while (!token.empty());
  if (g_json) {
    std::cout << ToJson(all) << "\n";
  } else {
    for (const auto& j : all.jobs()) {
      std::cout << std::left << std::setw(22) << j.id() << std::setw(10) << StateName(j.state()) << " model "
                << j.model_id() << " attempts " << j.attempts() << "\n";
    }
  }
  return kExitOk;
}

int CancelVerb(pare::client::Client& c, const VerbArgs& a) {
  auto job = c.Cancel(a.job_id);
  if (!job.ok()) return Fail(job.status(), "cancel " + a.job_id);
  if (g_json)
    std::cout << ToJson(job.value()) << "\n";
  else
    std::cout << job->id() << " " << StateName(job->state())
              << (job->state() == pare::v1::RUNNING ? " (stopping)" : "") << "\n";
  return kExitOk;
}

int DownloadVerb(pare::client::Client& c, const VerbArgs& a) {
  Status st = c.Download(a.job_id, pare::v1::MODEL, a.out);
  if (!st.ok()) return Fail(st, "download " + a.job_id);
  if (!a.report.empty()) {
    st = c.Download(a.job_id, pare::v1::REPORT, a.report);
    if (!st.ok()) return Fail(st, "download report of " + a.job_id);
  }
  if (!g_json) std::cout << "wrote " << a.out << (a.report.empty() ? "" : " and " + a.report) << "\n";
  return kExitOk;
}

int main(int argc, char** argv) {
  CLI::App app{"pare: compress computer-vision models with a Pare server (or offline)"};
  app.require_subcommand(1);
  app.fallthrough();  // global flags (--json, --server) may also follow the verb
  const char* env = std::getenv("PARE_SERVER");
  std::string server = env && *env ? env : "127.0.0.1:50051";
  double timeout = 30;
  const char* env_token = std::getenv("PARE_TOKEN");
  std::string token = env_token ? env_token : "";
  app.add_option("--server", server, "pare-server address (default $PARE_SERVER, else 127.0.0.1:50051)");
  app.add_option("--timeout", timeout, "deadline in seconds for each call")->capture_default_str();
  app.add_option("--token", token, "bearer token (default $PARE_TOKEN)");
  pare::TlsClientFiles tls;
  app.add_option("--tls-ca", tls.ca, "PEM CA of the server's certificate: talk TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-cert", tls.cert, "PEM client certificate, for mutual TLS")->check(CLI::ExistingFile);
  app.add_option("--tls-key", tls.key, "PEM key of --tls-cert")->check(CLI::ExistingFile);
  app.add_option("--tls-server-name", tls.server_name, "name expected in the server's certificate");
  app.add_flag("--json", g_json, "machine-readable output on stdout");

  VerbArgs args;

  auto* up_model = app.add_subcommand("upload-model", "upload a TorchScript model; prints its id");
  up_model->add_option("FILE", args.file, "the .pt file (torch.jit.save)")
      ->required()
      ->check(CLI::ExistingFile);
  up_model->add_option("--name", args.name, "a name for it (default: the file name)");
  up_model->add_option(
      "--input-shape", args.upload_shapes,
      "input shape for measurements, e.g. 1,3,224,224; repeat it for a model whose forward takes "
      "several tensors");

  auto* up_ds = app.add_subcommand("upload-dataset", "upload a dataset; prints its id");
  up_ds
      ->add_option(
          "FILE", args.file,
          "tensors: a torch.save file; idx: an IDX images file (or a tar of IDX files); image-folder: a "
          "folder of class folders of PNG/JPEG images (packed here) or a tar of one")
      ->required()
      ->check(CLI::ExistingPath);
  up_ds->add_option("--format", args.format, "tensors, idx or image-folder")
      ->required()
      ->check(CLI::IsMember({"tensors", "idx", "image-folder"}));
  up_ds->add_option("--labels", args.labels, "idx only: the IDX labels file that goes with FILE")
      ->check(CLI::ExistingFile);
  up_ds->add_option("--name", args.name, "a name for it");

  auto* submit = app.add_subcommand("submit", "submit a compression job; prints its id");
  submit->add_option("--model", args.model_id, "model id")->required();
  submit->add_option("--recipe", args.recipe, "recipe JSON file")->required()->check(CLI::ExistingFile);
  submit->add_option("--calibration", args.calib, "calibration dataset id");
  submit->add_option("--train", args.train, "training dataset id");
  submit->add_option("--eval", args.eval, "evaluation dataset id");
  submit->add_option("--device", args.device, "cpu, cuda or auto")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  submit->add_option("--request-id", args.request_id, "idempotency key: the same key returns the same job");
  submit->add_flag("--wait", args.wait, "follow the job until it ends");
  submit->add_option("--job-timeout", args.job_timeout,
                     "wall-clock seconds the job may run (0: the server's maximum)");

  auto* status = app.add_subcommand("status", "show a job");
  status->add_option("JOB", args.job_id)->required();
  auto* list = app.add_subcommand("list", "list jobs");
  list->add_option("--page-size", args.page_size)->capture_default_str();
  auto* cancel = app.add_subcommand("cancel", "cancel a job");
  cancel->add_option("JOB", args.job_id)->required();
  auto* waitc = app.add_subcommand("wait", "follow a job until it ends");
  waitc->add_option("JOB", args.job_id)->required();
  auto* download =
      app.add_subcommand("download", "download a job's compressed model (resumes a broken transfer)");
  download->add_option("JOB", args.job_id)->required();
  download->add_option("-o,--output", args.out, "where to write the model")->required();
  download->add_option("--report", args.report, "also write the JSON report here");

  CompressArgs ca;
  auto* compress = app.add_subcommand("compress", "run a recipe offline, without a server");
  compress->add_option("MODEL", ca.model, "the TorchScript model")->required()->check(CLI::ExistingFile);
  compress->add_option("--recipe", ca.recipe, "recipe JSON file")->required()->check(CLI::ExistingFile);
  compress->add_option("-o,--output", ca.out, "where to write the result")->required();
  compress->add_option("--report", ca.report, "write the JSON report here");
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
  compress->add_option(
      "--threads", ca.threads,
      "intra-op threads (0: the CPUs this process may use: affinity mask and cgroup CPU quota)");
  compress->add_option("--model", ca.extra_models,
                       "ID=FILE: a model the recipe names (distill teacherModel/studentModel), repeatable");
  compress
      ->add_option("--latency-budget", ca.latency_budget,
                   "seconds spent timing each model at each batch size")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 600.0));
  compress
      ->add_option("--latency-batches", ca.latency_batches,
                   "batch sizes to time, e.g. 1,32 (default: 1; 1 and 32 on a GPU)")
      ->delimiter(',');
  compress->add_option(
      "--latency-cache", ca.latency_cache,
      "a folder where the original model's latency is kept: a model timed before on this host with "
      "the same settings is not timed again (the report says so)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }

  if (compress->parsed()) {
    return Compress(ca);
  }

  pare::client::ClientOptions co;
  co.server = server;
  co.deadline_seconds = timeout;
  co.token = token;
  co.tls = tls;
  if (auto channel = pare::MakeChannel(server, tls); !channel.ok()) {
    Fail(channel.status(), "usage");
    return kExitUsage;
  }
  pare::client::Client c(co);

  if (up_model->parsed()) return UploadModelVerb(c, args);
  if (up_ds->parsed()) return UploadDatasetVerb(c, args);
  if (submit->parsed()) return SubmitVerb(c, args);
  if (status->parsed()) return StatusVerb(c, args);
  if (list->parsed()) return ListVerb(c, args);
  if (cancel->parsed()) return CancelVerb(c, args);
  if (waitc->parsed()) return WaitFor(c, args.job_id);
  if (download->parsed()) return DownloadVerb(c, args);
  return kExitUsage;
}
