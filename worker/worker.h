// pare-worker's lease loop: lease a job, fetch its inputs into a private folder and
// verify them, run the engine while heartbeating progress, stream the result back.
// One job at a time; on SIGTERM it stops leasing, and hands its job back if the drain
// grace period would run out before the job ends.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "common/tls.h"
#include "pare/v1/workers.grpc.pb.h"

namespace pare::worker {

struct WorkerOptions {
  std::string server = "127.0.0.1:50051";  // pare-server address
  std::string id;                          // worker id (default: hostname-pid)
  int threads = 0;                         // intra-op threads (0: the usable CPUs / cpu_share)
  int cpu_share = 1;                       // workers sharing this machine's CPUs (pare-server's local ones)
  std::string quantized_engine;            // onednn, qnnpack, fbgemm; empty: the best available
  std::string work_dir = "/tmp";           // private job folders are made under it
  int poll_ms = 500;                       // wait between empty lease answers
  double heartbeat_seconds = 1.0;          // progress and lease renewal interval
  double drain_seconds = 30;               // after SIGTERM, time left to finish the running job
  std::vector<int> latency_batches;        // empty: batch 1, and 32 too on a GPU (engine::CompressOptions)
  double latency_budget_seconds = 0.5;
  // The original model's latency is kept under work_dir/latency-cache between jobs, per model
  // digest, host and settings (engine::LatencyCache): a model submitted again is not re-timed.
  bool latency_cache = true;
  bool once = false;   // exit after one job (tests, batch use)
  std::string token;   // the server's worker token (default $PARE_WORKER_TOKEN)
  TlsClientFiles tls;  // TLS to the server
  // Limits of each job's process (0: none). The job runs in a child process of its own
  // (pare-worker --run-job): a crash, a limit or a timeout fails that job with a reason that
  // says so, and the worker goes on with the next job.
  double job_timeout_seconds = 3600;  // wall clock
  int64_t job_memory_mb = 0;          // address space (RLIMIT_AS); not applied to CUDA jobs
  int64_t job_cpu_seconds = 0;        // CPU time (RLIMIT_CPU)
  int64_t job_max_open_files = 1024;  // RLIMIT_NOFILE
};

// The job process: runs the engine on a folder prepared by the worker (spec.json, job.pb),
// prints progress as JSON lines on stdout, writes outcome.pb (a CompleteHeader). Exit code 0
// with an outcome, 3 when stopped by SIGTERM (cancel or hand-back).
int RunJobChild(const std::string& dir);

class Worker {
 public:
  explicit Worker(WorkerOptions options);
  // Returns the process exit code.
  int Run();
  // Async-signal-safe: only sets a flag.
  void RequestStop() { stop_ = true; }

 private:
  std::unique_ptr<grpc::ClientContext> Context(double seconds) const;
  // A leased job's life: folder, inputs, heartbeat, the sandboxed job process, the outcome.
  void RunJob(const v1::LeasedJob& job);
  // Fetches the job's inputs into `dir` and writes what the job process reads (spec.json,
  // job.pb); returns where the result will be. Throws EngineError.
  std::string PrepareJobFolder(const v1::LeasedJob& job, const std::string& dir);
  // Writes the input `sha` of the job to `path`; an error with the server's code (DATA_LOSS for a
  // corrupt or missing blob, or bytes that arrived with another digest), or throws when the
  // server stays unreachable (the job is handed back) or the disk fails.
  Status Fetch(const v1::LeasedJob& job, const std::string& sha, const std::string& path);
  void Complete(const v1::LeasedJob& job, v1::CompleteHeader header, const std::string& result_path);
  // Runs the job folder's job in a child process under the limits; QUEUED means it stopped
  // because `should_stop` asked it to.
  v1::CompleteHeader RunSandboxed(const std::string& dir, bool cuda_job, double timeout_seconds,
                                  const std::function<void(const nlohmann::json&)>& on_progress,
                                  const std::function<bool()>& should_stop,
                                  const std::function<std::string()>& current_step);

  WorkerOptions options_;
  std::unique_ptr<v1::Workers::Stub> stub_;
  std::atomic<bool> stop_{false};
  bool has_cuda_ = false;
  std::string device_name_;
};

}  // namespace pare::worker
