// pare-server assembled: store, blobs, the two gRPC services with health and reflection,
// the lease reaper and (embedded default) the local worker supervisor.
#pragma once

#include <grpcpp/grpcpp.h>
#include <prometheus/exposer.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "server/metrics.h"
#include "server/service_context.h"
#include "server/worker_supervisor.h"

namespace pare::server {

class CompressionService;
class Metrics;
class WorkersService;

struct ServerOptions {
  // host:port to listen on; port 0 picks a free one (see Server::port()).
  std::string listen = "127.0.0.1:50051";
  // Holds pare.db (SQLite, the default store) and the blob files.
  std::string data_dir = "./pare-data";
  // "sqlite" (DATA_DIR/pare.db) or a PostgreSQL URL (several servers on one database).
  std::string store = "sqlite";
  // A file holding the PostgreSQL password (so it is in neither the URL nor argv); empty: libpq
  // reads PGPASSWORD or ~/.pgpass.
  std::string store_password_file;
  // Where blobs (models, datasets, results) live: a folder (empty: DATA_DIR/blobs; replicas share
  // one ReadWriteMany volume) or "postgresql" (in the PostgreSQL store's database: replicas need
  // nothing else).
  std::string blob_store;
  // Local worker processes to start and supervise (0: workers are started separately).
  int local_workers = 1;
  // pare-worker binary; empty: next to this executable, or ../worker/ in a build tree.
  std::string worker_binary;
  // Intra-op threads of each local worker; 0: the CPUs this server may use, divided between its
  // local workers (each started with --cpu-share N).
  int worker_threads = 0;
  // Extra arguments for local workers (e.g. --latency-budget 1).
  std::vector<std::string> worker_args;
  Limits limits;
  // "TENANT TOKEN" lines; empty: no authentication (then only a loopback address is allowed).
  std::string auth_tokens_file;
  // File holding the worker token; empty with auth on: a random one, known to local workers only.
  std::string worker_token_file;
  // Threads doing store and disk work for the gRPC reactors, and the queue bound.
  int executor_threads = 4;
  size_t executor_queue = 4096;
  // How often expired leases are looked for.
  int reaper_interval_ms = 500;
  // TLS on the gRPC port (PEM files); with tls_client_ca, clients must present a certificate it
  // signed (mutual TLS). Local workers then use a second, loopback-only plaintext port.
  std::string tls_cert_file, tls_key_file, tls_client_ca_file;
  // host:port of the Prometheus /metrics endpoint (port 0 picks a free one); empty: none
  // (pare-server's flag defaults to 127.0.0.1:9090).
  std::string metrics_listen;
  // On drain: time given to running jobs and streams before they are handed back / cut.
  double drain_seconds = 30;
};

class Server {
 public:
  static Result<std::unique_ptr<Server>> Create(ServerOptions options,
                                                std::shared_ptr<Clock> clock = nullptr);
  ~Server();

  // Binds and starts serving, the reaper, and the local workers.
  Status Start();
  int port() const { return port_; }
  // Port of /metrics (0 when off).
  int metrics_port() const;
  // "sqlite" or "postgresql".
  std::string store_name() const { return store_->backend(); }
  // Where blobs live, for the start-up line: a folder, or "the postgresql database".
  std::string blobs_name() const;
  std::string address() const;
  // SIGTERM: health NOT_SERVING, refuse new work, let workers finish or hand back, stop.
  void Drain();
  // Blocks until Drain/Shutdown completed.
  void Wait();
  WorkerSupervisor* supervisor() { return supervisor_.get(); }
  ServiceContext* context() { return &ctx_; }

 private:
  explicit Server(ServerOptions options, std::shared_ptr<Clock> clock);
  Status SetUpAuth();
  // The blob store of --blob-store (the database's pool gets `password` as the store's does).
  Status OpenBlobs(const std::string& password);
  Status CheckSharedBlobs();
  void ReaperLoop();
  // `blobs`: also walk the blob folder (slow with many blobs: done less often).
  void RefreshGauges(bool blobs);
  void Shutdown();

  ServerOptions options_;
  std::shared_ptr<Clock> clock_;
  JobEvents events_;  // before store_: the store's listener publishes to it until it is destroyed
  std::unique_ptr<Store> store_;
  std::unique_ptr<BlobStore> blobs_;
  std::unique_ptr<Executor> executor_;
  Authenticator auth_;
  std::string worker_token_;  // handed to local workers through their environment
  ServiceContext ctx_;
  std::unique_ptr<CompressionService> compression_;
  std::unique_ptr<WorkersService> workers_;
  std::unique_ptr<grpc::Server> grpc_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  WorkerRegistry worker_registry_;
  std::atomic<bool> ready_{false};  // readiness last set on the health service
  // When a store call of the reaper or the gauges last failed (-1: not since the last recovery).
  std::atomic<int64_t> store_failed_ms_{-1};
  std::unique_ptr<WorkerSupervisor> supervisor_;
  int port_ = 0;
  int local_port_ = 0;  // loopback plaintext port for local workers when the main port is TLS

  std::mutex mu_;  // guards stopping_ and stopped_
  std::condition_variable cv_;
  bool stopping_ = false;
  bool stopped_ = false;
  std::thread reaper_;
};

}  // namespace pare::server
