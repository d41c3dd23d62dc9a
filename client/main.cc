// pare: the command-line client. Verbs talk to pare-server over gRPC, except `compress`,
// which runs the same engine offline. Exit codes: 0 success, 1 job FAILED/CANCELLED,
// 2 usage, 3 server unreachable or deadline exceeded, 4 refused (invalid, not found, data loss).
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

#include "client/cli.h"
#include "client/client.h"
#include "client/compress_verb.h"
#include "client/tar_pack.h"
#include "common/sha256.h"
#include "worker/engine/engine.h"
#include "worker/engine/error.h"
#include "worker/recipe_convert.h"

using namespace pare::cli;  // NOLINT: the CLI's shared pieces

namespace {

namespace fs = std::filesystem;
using pare::Code;
using pare::Result;
using pare::Status;
void PrintJobSummary(const pare::v1::Job& j) {
  std::cout << "job " << j.id() << " " << StateName(j.state()) << " attempts=" << j.attempts() << "\n";
  if (j.has_error() && !j.error().code().empty()) {
    std::cout << "error " << j.error().code() << " " << j.error().reason() << ": " << j.error().message()
              << "\n";
    if (!j.result_sha256().empty()) {
      std::cout << "its result (the closest candidate) and report can still be downloaded: pare download "
                << j.id() << " -o FILE --report FILE\n";
    }
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
                                                                                job_id, out, report, html;
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
  // A recipe that does not parse is refused as the server would refuse it (and as pare compress does).
  auto parsed = pare::ParseRecipeJson(text);
  if (!parsed.ok()) return Fail(parsed.status(), a.recipe);
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

// `pare report SOURCE --html FILE`: SOURCE is a report JSON file (pare compress --report, pare download
// --report) or a job id, whose report is fetched from the server.
int ReportVerb(pare::client::Client& c, const VerbArgs& a) {
  std::string path = a.job_id;
  std::string fetched;
  const bool looks_like_file = a.job_id.find('/') != std::string::npos || fs::path(a.job_id).has_extension();
  if (!fs::is_regular_file(a.job_id) && looks_like_file) {
    Fail(pare::InvalidArgument("SOURCE " + a.job_id + ": no such file (a job id has no '/' or extension)"),
         "usage");
    return kExitUsage;
  }
  if (!fs::is_regular_file(a.job_id)) {
    fetched = (fs::temp_directory_path() / ("pare-report-" + std::to_string(::getpid()) + ".json")).string();
    Status st = c.Download(a.job_id, pare::v1::REPORT, fetched);
    if (!st.ok()) return Fail(st, "report of " + a.job_id);
    path = fetched;
  }
  std::string text;
  Status st = ReadFile(path, &text);
  if (!fetched.empty()) fs::remove(fetched);
  if (!st.ok()) return Fail(st, "reading " + path);
  st = WriteReportHtml(text, a.job_id, a.html);
  if (!st.ok()) return Fail(st, "report " + a.job_id);
  if (!g_json) std::cout << "wrote " << a.html << "\n";
  return kExitOk;
}

// The verbs that talk to a server, their arguments filled into `args`.
struct ServerVerbs {
  CLI::App *up_model, *up_ds, *submit, *status, *list, *cancel, *waitc, *download, *report;
};

ServerVerbs AddServerVerbs(CLI::App& app, VerbArgs& args) {
  ServerVerbs v{};
  v.up_model = app.add_subcommand("upload-model", "upload a TorchScript model; prints its id");
  v.up_model->add_option("FILE", args.file, "the .pt file (torch.jit.save)")
      ->required()
      ->check(CLI::ExistingFile);
  v.up_model->add_option("--name", args.name, "a name for it (default: the file name)");
  v.up_model->add_option(
      "--input-shape", args.upload_shapes,
      "input shape for measurements, e.g. 1,3,224,224; repeat it for a model whose forward takes "
      "several tensors");

  v.up_ds = app.add_subcommand("upload-dataset", "upload a dataset; prints its id");
  v.up_ds
      ->add_option(
          "FILE", args.file,
          "tensors: a torch.save file; idx: an IDX images file (or a tar of IDX files); image-folder: a "
          "folder of class folders of PNG/JPEG images (packed here) or a tar of one")
      ->required()
      ->check(CLI::ExistingPath);
  v.up_ds->add_option("--format", args.format, "tensors, idx or image-folder")
      ->required()
      ->check(CLI::IsMember({"tensors", "idx", "image-folder"}));
  v.up_ds->add_option("--labels", args.labels, "idx only: the IDX labels file that goes with FILE")
      ->check(CLI::ExistingFile);
  v.up_ds->add_option("--name", args.name, "a name for it");

  v.submit = app.add_subcommand("submit", "submit a compression job; prints its id");
  v.submit->add_option("--model", args.model_id, "model id")->required();
  v.submit->add_option("--recipe", args.recipe, "recipe JSON file")->required()->check(CLI::ExistingFile);
  v.submit->add_option("--calibration", args.calib, "calibration dataset id");
  v.submit->add_option("--train", args.train, "training dataset id");
  v.submit->add_option("--eval", args.eval, "evaluation dataset id");
  v.submit->add_option("--device", args.device, "cpu, cuda or auto")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  v.submit->add_option("--request-id", args.request_id, "idempotency key: the same key returns the same job");
  v.submit->add_flag("--wait", args.wait, "follow the job until it ends");
  v.submit->add_option("--job-timeout", args.job_timeout,
                       "wall-clock seconds the job may run (0: the server's maximum)");

  v.status = app.add_subcommand("status", "show a job");
  v.status->add_option("JOB", args.job_id)->required();
  v.list = app.add_subcommand("list", "list jobs");
  v.list->add_option("--page-size", args.page_size)->capture_default_str();
  v.cancel = app.add_subcommand("cancel", "cancel a job");
  v.cancel->add_option("JOB", args.job_id)->required();
  v.waitc = app.add_subcommand("wait", "follow a job until it ends");
  v.waitc->add_option("JOB", args.job_id)->required();
  v.download =
      app.add_subcommand("download", "download a job's compressed model (resumes a broken transfer)");
  v.download->add_option("JOB", args.job_id)->required();
  v.download->add_option("-o,--output", args.out, "where to write the model")->required();
  v.download->add_option("--report", args.report, "also write the JSON report here");
  v.report = app.add_subcommand("report", "render a job's report as one self-contained HTML page");
  v.report->add_option("SOURCE", args.job_id, "a job id, or a report JSON file (pare compress --report)")
      ->required();
  v.report->add_option("--html", args.html, "where to write the page")->required();
  return v;
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
  const ServerVerbs v = AddServerVerbs(app, args);
  CompressArgs ca;
  CLI::App* compress = AddCompressVerb(app, ca);

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

  if (v.up_model->parsed()) return UploadModelVerb(c, args);
  if (v.up_ds->parsed()) return UploadDatasetVerb(c, args);
  if (v.submit->parsed()) return SubmitVerb(c, args);
  if (v.status->parsed()) return StatusVerb(c, args);
  if (v.list->parsed()) return ListVerb(c, args);
  if (v.cancel->parsed()) return CancelVerb(c, args);
  if (v.waitc->parsed()) return WaitFor(c, args.job_id);
  if (v.download->parsed()) return DownloadVerb(c, args);
  if (v.report->parsed()) return ReportVerb(c, args);
  return kExitUsage;
}
