#include "server/server.h"

#include <google/protobuf/descriptor.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/support/server_interceptor.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>

#include "common/grpc_status.h"
#include "common/ids.h"
#include "common/protocol.h"

#include "common/logging.h"
#include "common/tls.h"
#include "server/compression_service.h"
#include "server/job_end.h"
#include "server/pg_backend.h"
#include "server/sql_store.h"
#include "server/workers_service.h"

namespace pare::server {
namespace {

namespace fs = std::filesystem;

std::string FindWorkerBinary() {
  std::error_code ec;
  fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "pare-worker";
  for (const fs::path& candidate :
       {self.parent_path() / "pare-worker", self.parent_path() / ".." / "worker" / "pare-worker",
        self.parent_path().parent_path() / "worker" / "pare-worker"}) {
    if (fs::exists(candidate)) return fs::canonical(candidate).string();
  }
  return "pare-worker";
}

// Counts every call by method and status code and times it, streams included.
class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(Metrics* metrics, std::string method)
      : metrics_(metrics), method_(std::move(method)), start_(std::chrono::steady_clock::now()) {
    metrics_->CallStarted();
  }
  ~MetricsInterceptor() override {
    if (!finished_) metrics_->CallFinished(method_, "CANCELLED", Elapsed());
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      finished_ = true;
      metrics_->CallFinished(method_, CodeName(methods->GetSendStatus().error_code()), Elapsed());
    }
    methods->Proceed();
  }

 private:
  double Elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  static std::string CodeName(grpc::StatusCode c) { return ::pare::CodeName(FromGrpcCode(c)); }
  Metrics* metrics_;
  std::string method_;
  std::chrono::steady_clock::time_point start_;
  bool finished_ = false;
};

class MetricsInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(Metrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(metrics_, info->method() ? info->method() : "unknown");
  }

 private:
  Metrics* metrics_;
};

std::vector<std::string> ServiceMethods() {
  std::vector<std::string> out;
  for (const char* name : {"pare.v1.Compression", "pare.v1.Workers"}) {
    const auto* service = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    if (!service) continue;
    for (int i = 0; i < service->method_count(); ++i)
      out.push_back("/" + std::string(name) + "/" + service->method(i)->name());
  }
  out.push_back("/grpc.health.v1.Health/Check");
  return out;
}

// The health service name a readiness probe asks: SERVING only while a worker is connected.
constexpr char kReadinessService[] = "pare.readiness";

}  // namespace

Server::Server(ServerOptions options, std::shared_ptr<Clock> clock)
    : options_(std::move(options)), clock_(std::move(clock)) {}

Result<std::unique_ptr<Server>> Server::Create(ServerOptions options, std::shared_ptr<Clock> clock) {
  if (options.local_workers < 0 || options.local_workers > 256) {
    return InvalidArgument("--local-workers must be in [0, 256]");
  }
  if (options.executor_threads < 1) return InvalidArgument("executor_threads must be at least 1");
  if (options.limits.lease_ttl_ms < 1000)
    return InvalidArgument("the lease time-to-live must be at least 1 s");
  if (options.limits.max_attempts < 1) return InvalidArgument("max attempts must be at least 1");
  if (options.limits.max_upload_bytes == 0) return InvalidArgument("--max-upload-bytes must be positive");
  if (!clock) clock = std::make_shared<SystemClock>();
  std::unique_ptr<Server> s(new Server(std::move(options), std::move(clock)));
  PARE_RETURN_IF_ERROR(s->SetUpAuth());
  std::error_code ec;
  fs::create_directories(s->options_.data_dir, ec);
  if (ec) return Internal("cannot create data dir " + s->options_.data_dir + ": " + ec.message());
  std::string password;
  if (!s->options_.store_password_file.empty()) {
    std::ifstream in(s->options_.store_password_file);
    if (!std::getline(in, password) || password.empty()) {
      return InvalidArgument("--store-password-file: cannot read a password from " +
                             s->options_.store_password_file);
    }
    if (password.back() == '\r') password.pop_back();
  }
  if (RedactUrl(s->options_.store) != s->options_.store) {
    spdlog::warn(Kv({{"msg",
                      "the --store URL holds a password, which any local user sees in the process list: "
                      "use --store-password-file"}}));
  }
  if (!password.empty() && s->options_.store == "sqlite") {
    return InvalidArgument("--store-password-file is for a PostgreSQL --store; the store is sqlite");
  }
  auto store = OpenStore(s->options_.store, s->options_.data_dir, password);
  if (!store.ok()) {
    return Status(store.status().code(),
                  "store " + RedactUrl(s->options_.store) + ": " + store.status().message());
  }
  s->store_ = std::move(store).value();
  PARE_RETURN_IF_ERROR(s->OpenBlobs(password));
  s->executor_ = std::make_unique<Executor>(s->options_.executor_threads, s->options_.executor_queue);
  s->ctx_.store = s->store_.get();
  s->ctx_.blobs = s->blobs_.get();
  s->ctx_.executor = s->executor_.get();
  s->ctx_.events = &s->events_;
  // Jobs changed through other servers on the same database reach this one's watchers too.
  s->store_->ListenForChanges([events = &s->events_](const std::string& job_id) {
    if (job_id.empty())
      events->PublishAll();
    else
      events->Publish(job_id);
  });
  s->ctx_.clock = s->clock_.get();
  s->ctx_.auth = &s->auth_;
  s->metrics_ = std::make_unique<Metrics>(ServiceMethods(), PARE_VERSION, PARE_LIBTORCH_VERSION);
  s->ctx_.metrics = s->metrics_.get();
  s->ctx_.workers = &s->worker_registry_;
  s->ctx_.limits = s->options_.limits;
  s->compression_ = std::make_unique<CompressionService>(&s->ctx_);
  s->workers_ = std::make_unique<WorkersService>(&s->ctx_);
  return s;
}

Server::~Server() { Shutdown(); }

Status Server::SetUpAuth() {
  const std::string host = options_.listen.substr(0, options_.listen.rfind(':'));
  const bool loopback =
      host == "127.0.0.1" || host == "localhost" || host == "[::1]" || host.rfind("127.", 0) == 0;
  if (options_.auth_tokens_file.empty()) {
    if (!loopback) {
      return InvalidArgument(
          "--listen " + options_.listen +
          " is not a loopback address: give --auth-tokens (and --worker-token-file) to serve "
          "other machines");
    }
    spdlog::warn(Kv(
        {{"msg", "AUTHENTICATION IS OFF: every local caller is tenant 'default'; serving loopback only"}}));
    return Status::Ok();
  }
  if (!options_.worker_token_file.empty()) {
    std::ifstream in(options_.worker_token_file);
    if (!(in >> worker_token_))
      return InvalidArgument("--worker-token-file: cannot read " + options_.worker_token_file);
  } else {
    worker_token_ = NewId("wt") + NewId("k");  // 32 random hex digits; only local workers learn it
  }
  PARE_ASSIGN_OR_RETURN(auto auth, Authenticator::FromFile(options_.auth_tokens_file, worker_token_));
  auth_ = std::move(auth);
  return Status::Ok();
}

Status Server::OpenBlobs(const std::string& password) {
  const std::string& spec = options_.blob_store;
  std::string lower = spec;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  // Uploads in progress are written to DATA_DIR/tmp on every kind of store.
  const std::string tmp = options_.data_dir + "/tmp";
  if (lower.find("://") != std::string::npos) {
    return InvalidArgument(
        "--blob-store takes 'postgresql' (the blobs in the --store database) or a folder, not a "
        "URL: got '" +
        RedactUrl(spec) + "'");
  }
  if (lower == "postgresql" || lower == "postgres") {
    if (store_->backend() != "postgresql") {
      return InvalidArgument(
          "--blob-store postgresql keeps blobs in the PostgreSQL store's database; the store is " +
          store_->backend() + " (give --store postgresql://...)");
    }
    // A pool of its own: a long upload's transaction does not hold the job calls' connections.
    auto db = OpenPostgres(options_.store, password, /*pool_size=*/4);
    if (!db.ok()) return Status(db.status().code(), "--blob-store postgresql: " + db.status().message());
    // Each replica has a data folder of its own then: what a crash left in its tmp/ goes at start.
    PARE_ASSIGN_OR_RETURN(blobs_,
                          DatabaseBlobStore::Open(std::move(db).value(), tmp, /*shared=*/false, kChunkBytes));
    return CheckSharedBlobs();
  }
  const std::string dir = spec.empty() ? options_.data_dir + "/blobs" : spec;
  PARE_ASSIGN_OR_RETURN(auto files,
                        FileBlobStore::Open(dir, spec.empty() ? tmp : dir + "/tmp", store_->shared()));
  blobs_ = std::move(files);
  return CheckSharedBlobs();
}

std::string Server::blobs_name() const {
  if (auto* files = dynamic_cast<const FileBlobStore*>(blobs_.get())) return files->dir();
  return "the " + blobs_->kind() + " database";
}

// Replicas on one database must share one blob store: a replica on a folder of its own would
// accept uploads whose jobs then fail on other replicas' workers. When the database has models
// and this blob store (a folder, or the database itself) holds none of the latest ones, the
// server refuses to start.
Status Server::CheckSharedBlobs() {
  if (!store_->shared()) return Status::Ok();
  const bool in_db = blobs_->kind() != "files";
  PARE_ASSIGN_OR_RETURN(auto digests, store_->RecentModelDigests(8));
  if (digests.empty()) return Status::Ok();
  for (const auto& sha : digests) {
    auto has = blobs_->Has(sha);
    if (!has.ok() || has.value()) return has.status();
  }
  if (in_db) {
    return FailedPrecondition(
        "the database holds none of the blobs of the " + std::to_string(digests.size()) +
        " models it stored last: they are in a blob folder (--data-dir or --blob-store DIR), "
        "which pare-server does not move into the database; keep using that folder");
  }
  const std::string folder =
      options_.blob_store.empty() ? "--data-dir " + options_.data_dir : "--blob-store " + options_.blob_store;
  return FailedPrecondition(folder + " holds none of the " + std::to_string(digests.size()) +
                            " models stored last in this database: replicas on one database must share one "
                            "blob folder (a ReadWriteMany volume), or keep blobs in the database "
                            "(--blob-store postgresql)");
}

std::string Server::address() const {
  auto colon = options_.listen.rfind(':');
  return options_.listen.substr(0, colon) + ":" + std::to_string(port_);
}

Status Server::Start() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  const bool tls = !options_.tls_cert_file.empty();
  if (tls) {
    PARE_ASSIGN_OR_RETURN(auto c, TlsServerCredentials(options_.tls_cert_file, options_.tls_key_file,
                                                       options_.tls_client_ca_file));
    credentials = c;
  } else if (!options_.tls_key_file.empty() || !options_.tls_client_ca_file.empty()) {
    return InvalidArgument("--tls-key and --tls-client-ca need --tls-cert");
  }
  builder.AddListeningPort(options_.listen, credentials, &port_);
  if (tls && options_.local_workers > 0) {
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &local_port_);
  }
  builder.RegisterService(compression_.get());
  builder.RegisterService(workers_.get());
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<MetricsInterceptorFactory>(metrics_.get()));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  if (!options_.metrics_listen.empty()) {
    try {
      exposer_ = std::make_unique<prometheus::Exposer>(options_.metrics_listen);
    } catch (const std::exception& e) {
      return Unavailable("cannot serve metrics on " + options_.metrics_listen + ": " + e.what());
    }
    exposer_->RegisterCollectable(metrics_->registry());
  }
  grpc_ = builder.BuildAndStart();
  if (!grpc_ || port_ == 0) return Unavailable("cannot listen on " + options_.listen + " (address in use?)");
  grpc_->GetHealthCheckService()->SetServingStatus(true);
  // Liveness ("") is SERVING; readiness waits for a worker (RefreshGauges).
  grpc_->GetHealthCheckService()->SetServingStatus(kReadinessService, false);
  RefreshGauges(/*blobs=*/true);
  reaper_ = std::thread([this] { ReaperLoop(); });
  if (options_.local_workers > 0) {
    SupervisorOptions so;
    so.worker_binary = options_.worker_binary.empty() ? FindWorkerBinary() : options_.worker_binary;
    const int worker_port = local_port_ ? local_port_ : port_;
    so.args = {"--server", "127.0.0.1:" + std::to_string(worker_port), "--drain-seconds",
               std::to_string(options_.drain_seconds)};
    // Several local workers share this machine's CPUs: without a thread count of the operator's,
    // each job runs on its worker's share of them, not on all of them at once.
    if (options_.worker_threads > 0) {
      so.args.insert(so.args.end(), {"--threads", std::to_string(options_.worker_threads)});
    } else if (options_.local_workers > 1) {
      so.args.insert(so.args.end(), {"--cpu-share", std::to_string(options_.local_workers)});
    }
    so.args.insert(so.args.end(), options_.worker_args.begin(), options_.worker_args.end());
    so.count = options_.local_workers;
    if (!worker_token_.empty()) so.env.emplace_back("PARE_WORKER_TOKEN", worker_token_);
    supervisor_ = std::make_unique<WorkerSupervisor>(so);
    supervisor_->Start();
  }
  spdlog::info(Kv(
      {{"msg", "serving"},
       {"address", address()},
       {"data_dir", options_.data_dir},
       {"metrics", options_.metrics_listen.empty()
                       ? "off"
                       : "http://" + options_.metrics_listen.substr(0, options_.metrics_listen.rfind(':')) +
                             ":" + std::to_string(metrics_port()) + "/metrics"},
       {"local_workers", std::to_string(options_.local_workers)}}));
  return Status::Ok();
}

int Server::metrics_port() const {
  if (!exposer_) return 0;
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

// Gauges from the store, the workers' calls, the blob folder and the supervisor; and the
// readiness status.
void Server::RefreshGauges(bool blobs) {
  const int64_t now = clock_->NowMs();
  auto counts = store_->CountJobs();
  if (counts.ok()) metrics_->SetJobsByState(counts.value());
  if (!counts.ok()) store_failed_ms_ = now;  // the reaper waits a lease period after it recovers
  auto queued = store_->QueuedByDevice();
  if (queued.ok()) metrics_->SetQueuedByDevice(queued.value());
  auto workers = worker_registry_.Snapshot(now, options_.limits.lease_ttl_ms);
  metrics_->SetWorkers(workers);
  int connected = 0;
  for (const auto& [device, c] : workers) connected += c.first;
  if (supervisor_) metrics_->SetLocalWorkerRestarts(supervisor_->restarts());
  if (blobs) {
    auto stored = blobs_->CountAndBytes();
    if (stored.ok()) metrics_->SetBlobs(stored.value().first, stored.value().second);
  }
  // One server (SQLite): ready while a worker is connected to it, since it alone hands out the
  // jobs. Replicas on PostgreSQL: a worker connects to one of them and any replica serves any
  // call, so each is ready while it reaches the database (workers are the cluster's concern:
  // its autoscaler's, from pare_jobs_queued).
  const bool replicated = store_->shared();
  const bool ready = !ctx_.draining && (replicated ? counts.ok() : connected > 0);
  if (grpc_ && ready != ready_) {
    ready_ = ready;
    grpc_->GetHealthCheckService()->SetServingStatus(kReadinessService, ready);
    std::string why =
        ready ? (replicated ? "ready: the database answers" : "ready: a worker is connected")
              : (ctx_.draining
                     ? "not ready: draining"
                     : (replicated ? "not ready: the database does not answer: " + counts.status().message()
                                   : "not ready: no worker connected"));
    spdlog::info(Kv({{"msg", why}, {"workers", std::to_string(connected)}}));
  }
}

void Server::ReaperLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  auto last_refresh = std::chrono::steady_clock::now();
  int refreshes = 0;
  while (!stopping_) {
    lock.unlock();
    // After the database could not be reached, neither could the workers' heartbeats: a lease
    // that ran out meanwhile belongs to a worker that may be fine. Leases are expired again only
    // once a whole lease period has passed with the database answering, so an outage longer
    // than the lease (a failover) restarts no job.
    const int64_t now = clock_->NowMs();
    const int64_t failed = store_failed_ms_.load();
    Result<std::vector<JobRecord>> changed = std::vector<JobRecord>{};
    if (failed < 0 || now - failed > options_.limits.lease_ttl_ms) changed = store_->ExpireLeases(now);
    if (!changed.ok()) {
      if (store_failed_ms_.exchange(now) < 0) {  // once per outage
        // The cause is the store's error line just before; the status is the one callers get.
        spdlog::error(Kv({{"msg", "lease reaper failed: the database error is logged just before"},
                          {"code", CodeName(changed.status().code())}}));
      }
    } else if (failed >= 0 && now - failed > options_.limits.lease_ttl_ms) {
      store_failed_ms_ = -1;
      spdlog::info(Kv({{"msg", "the lease reaper works again: leases are expired again"}}));
    }
    if (changed.ok()) {
      for (const auto& j : changed.value()) {
        spdlog::warn(Kv({{"msg", "lease expired"},
                         {"job", j.id},
                         {"model", j.model_id},
                         {"state", JobStateName(j.state)},
                         {"attempts", std::to_string(j.attempts)}}));
        metrics_->LeaseExpired(j.state == JobState::kQueued);
        JobChanged(ctx_, j, worker_registry_.DeviceOf(j.worker));
      }
    }
    if (std::chrono::steady_clock::now() - last_refresh > std::chrono::seconds(1)) {
      RefreshGauges(/*blobs=*/++refreshes % 15 == 0);  // gauges every second, blob totals every 15 s
      last_refresh = std::chrono::steady_clock::now();
    }
    lock.lock();
    cv_.wait_for(lock, std::chrono::milliseconds(options_.reaper_interval_ms), [this] { return stopping_; });
  }
}

void Server::Drain() {
  if (!grpc_) return;
  spdlog::info(Kv({{"msg", "draining"}, {"grace_seconds", std::to_string(options_.drain_seconds)}}));
  grpc_->GetHealthCheckService()->SetServingStatus(false);
  ctx_.draining = true;
  ready_ = false;
  // Local workers finish their job within the grace period or hand it back, then exit.
  if (supervisor_) supervisor_->Stop(options_.drain_seconds);
  Shutdown();
}

void Server::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (supervisor_) supervisor_->Stop(0);
  if (grpc_) {
    grpc_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  }
  if (reaper_.joinable()) reaper_.join();
  if (executor_) executor_->Stop();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
}

void Server::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return stopped_; });
}

}  // namespace pare::server
