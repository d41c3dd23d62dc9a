// pare-server: the gRPC front end. With no flags it is the embedded default: state under
// ./pare-data (SQLite + blob files) and one local worker process started and supervised.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <iostream>
#include <thread>

#include "common/logging.h"
#include "server/server.h"

namespace {

// The command line's flags, each writing its field of `o`.
void AddOptions(CLI::App& app, pare::server::ServerOptions& o) {
  app.add_option("--listen", o.listen, "host:port for gRPC (port 0 picks a free port)")
      ->capture_default_str();
  app.add_option(
         "--data-dir", o.data_dir,
         "folder for the SQLite store, the blob files (unless --blob-store says otherwise) and uploads "
         "in progress")
      ->capture_default_str();
  app.add_option("--store", o.store,
                 "job database: sqlite (in --data-dir) or postgresql://user@host:5432/db[?sslmode=...] "
                 "for several replicas")
      ->capture_default_str();
  app.add_option("--blob-store", o.blob_store,
                 "where models, datasets and results live: a folder (default: DATA_DIR/blobs; replicas share "
                 "one ReadWriteMany volume) or 'postgresql' (in the --store database: replicas need nothing "
                 "else)");
  app.add_option("--store-password-file", o.store_password_file,
                 "file holding the PostgreSQL password, used instead of any in the URL (default: "
                 "PGPASSWORD or ~/.pgpass)")
      ->check(CLI::ExistingFile);
  app.add_option("--local-workers", o.local_workers, "local pare-worker processes to supervise (0: none)")
      ->capture_default_str();
  app.add_option("--worker-binary", o.worker_binary,
                 "path of pare-worker (default: found beside pare-server)");
  app.add_option("--worker-threads", o.worker_threads,
                 "intra-op threads of each local worker (0, the default: the CPUs pare-server may use, "
                 "divided between its local workers)")
      ->check(CLI::Range(0, 4096));
  app.add_option("--max-upload-bytes", o.limits.max_upload_bytes, "largest model or dataset accepted")
      ->capture_default_str();
  app.add_option_function<double>(
      "--lease-ttl", [&o](double seconds) { o.limits.lease_ttl_ms = static_cast<int64_t>(seconds * 1000); },
      "seconds a job stays leased without a heartbeat (default " +
          std::to_string(o.limits.lease_ttl_ms / 1000) + ")");
  app.add_option("--max-attempts", o.limits.max_attempts, "leases a job may take before it fails")
      ->capture_default_str();
  app.add_option("--drain-seconds", o.drain_seconds, "grace period on SIGTERM")->capture_default_str();
  app.add_option("--tenant-max-bytes", o.limits.tenant_max_bytes,
                 "bytes of models and datasets one tenant may store (0: no limit)")
      ->capture_default_str();
  app.add_option("--tenant-max-active-jobs", o.limits.tenant_max_active_jobs,
                 "queued + running jobs one tenant may have")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max-job-seconds", o.limits.max_job_seconds,
                 "longest wall-clock limit a job may ask for, and the limit of jobs that ask for none")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max-queued-jobs", o.limits.max_queued_jobs, "queued jobs of all tenants together")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--metrics-listen", o.metrics_listen,
                 "host:port for Prometheus /metrics (port 0 picks a free one; empty: off)")
      ->capture_default_str();
  app.add_option("--auth-tokens", o.auth_tokens_file,
                 "file of 'TENANT TOKEN' lines; without it, loopback only")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-cert", o.tls_cert_file, "PEM certificate: serve gRPC over TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-key", o.tls_key_file, "PEM key of --tls-cert")->check(CLI::ExistingFile);
  app.add_option("--tls-client-ca", o.tls_client_ca_file,
                 "PEM CA: require client certificates it signed (mutual TLS)")
      ->check(CLI::ExistingFile);
  app.add_option("--worker-token-file", o.worker_token_file, "file holding the token workers present")
      ->check(CLI::ExistingFile);
}

}  // namespace

int main(int argc, char** argv) {
  pare::server::ServerOptions o;
  o.metrics_listen = "127.0.0.1:9090";
  CLI::App app{"pare-server: the Pare model-compression service"};
  AddOptions(app, o);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // a usage error exits 2, as pare's do (CLI11's own codes are 100+)
  }

  pare::InitLogging("server");
  // Signals are taken by one thread with sigwait; block them before any thread starts.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto server = pare::server::Server::Create(o);
  if (!server.ok()) {
    std::cerr << "pare-server: " << server.status().message() << "\n";
    return 2;
  }
  auto st = server.value()->Start();
  if (!st.ok()) {
    std::cerr << "pare-server: " << st.message() << "\n";
    return 1;
  }
  std::cout << "pare-server listening on " << server.value()->address() << " (store "
            << server.value()->store_name() << ", blobs in " << server.value()->blobs_name() << ", "
            << o.local_workers << " local worker" << (o.local_workers == 1 ? "" : "s") << ")";
  if (int mp = server.value()->metrics_port()) {
    std::cout << "; metrics on http://" << o.metrics_listen.substr(0, o.metrics_listen.rfind(':')) << ":"
              << mp << "/metrics";
  }
  std::cout << std::endl;
  std::thread signals([&] {
    int sig = 0;
    sigwait(&set, &sig);
    spdlog::info(pare::Kv({{"msg", "signal received"}, {"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}}));
    server.value()->Drain();
  });
  signals.detach();
  server.value()->Wait();
  return 0;
}
