// pare-worker: pulls jobs from pare-server over gRPC and runs them with the engine.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "common/cli_checks.h"
#include "common/logging.h"
#include "worker/worker.h"

namespace {
pare::worker::Worker* g_worker = nullptr;
void OnSignal(int) {
  if (g_worker) g_worker->RequestStop();
}
}  // namespace

int main(int argc, char** argv) {
  pare::worker::WorkerOptions o;
  CLI::App app{"pare-worker: runs Pare compression jobs"};
  app.add_option("--server", o.server, "pare-server address")->capture_default_str();
  app.add_option("--id", o.id, "worker id (default: hostname-pid)");
  app.add_option("--threads", o.threads,
                 "intra-op threads (0: the CPUs this process may use: affinity mask and cgroup CPU quota)")
      ->capture_default_str()
      ->check(CLI::Range(0, 4096));
  app.add_option("--cpu-share", o.cpu_share,
                 "workers sharing this machine's CPUs: with --threads 0 each job runs on its share of them "
                 "(pare-server sets it for its local workers)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  app.add_option("--quantized-engine", o.quantized_engine,
                 "onednn, qnnpack or fbgemm (default: best available)");
  app.add_option("--work-dir", o.work_dir, "where private job folders are made")->capture_default_str();
  app.add_option("--poll-ms", o.poll_ms, "wait between empty lease answers")->capture_default_str();
  app.add_option("--drain-seconds", o.drain_seconds, "time to finish a job after SIGTERM")
      ->capture_default_str();
  app.add_option("--latency-batches", o.latency_batches,
                 "batch sizes for latency measurements, e.g. 1,32 (default: 1; 1 and 32 on a GPU)")
      ->delimiter(',');
  app.add_option(
         "--latency-budget", o.latency_budget_seconds,
         "seconds a job spends timing models, warm-up included, shared by the original, each step's "
         "result and each batch size (each at least 3 timed runs); an auto step times each trial with "
         "all of it")
      ->capture_default_str()
      ->check(pare::NumberIn(0, 600));
  app.add_flag("--no-latency-cache{false}", o.latency_cache,
               "time every job's original model (default: a model timed before on this host with the same "
               "settings takes its latency from WORK_DIR/latency-cache)");
  app.add_flag("--once", o.once, "exit after one job");
  app.add_option("--job-timeout", o.job_timeout_seconds, "wall-clock seconds a job may run (0: no limit)")
      ->capture_default_str();
  app.add_option("--job-memory-mb", o.job_memory_mb,
                 "address-space limit of a CPU job's process in MiB (0: none)")
      ->capture_default_str();
  app.add_option("--job-cpu-seconds", o.job_cpu_seconds, "CPU-time limit of a job's process (0: none)")
      ->capture_default_str();
  app.add_option("--job-max-open-files", o.job_max_open_files, "open-files limit of a job's process")
      ->capture_default_str();
  app.add_option("--tls-ca", o.tls.ca, "PEM CA of the server's certificate: talk TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-cert", o.tls.cert, "PEM client certificate, for mutual TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-key", o.tls.key, "PEM key of --tls-cert")->check(CLI::ExistingFile);
  app.add_option("--tls-server-name", o.tls.server_name, "name expected in the server's certificate");
  std::string run_job;
  app.add_option("--run-job", run_job,
                 "internal: run the job prepared in this folder (the sandboxed job process)");
  std::string token_file;
  app.add_option("--token-file", token_file, "file holding the worker token (default $PARE_WORKER_TOKEN)")
      ->check(CLI::ExistingFile);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // a usage error exits 2, as pare's do (CLI11's own codes are 100+)
  }
  if (auto problem = pare::LatencyBatchesProblem(o.latency_batches); !problem.empty()) {
    std::cerr << "pare-worker: " << problem << "\n";
    return 2;
  }
  if (!run_job.empty()) {
    pare::InitLogging("job");
    return pare::worker::RunJobChild(run_job);
  }

  if (!token_file.empty()) {
    std::ifstream in(token_file);
    in >> o.token;
  } else if (const char* t = std::getenv("PARE_WORKER_TOKEN")) {
    o.token = t;
  }
  pare::InitLogging("worker");
  if (auto channel = pare::MakeChannel(o.server, o.tls); !channel.ok()) {
    std::cerr << "pare-worker: " << channel.status().message() << "\n";
    return 2;
  }
  pare::worker::Worker worker(o);
  g_worker = &worker;
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return worker.Run();
}
