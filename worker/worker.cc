#include "worker/worker.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <thread>

#include "common/logging.h"
#include "common/retry.h"
#include "worker/dataset_files.h"
#include "worker/engine/engine.h"
#include "worker/engine/error.h"
#include "worker/recipe_convert.h"
#include "worker/torch_info.h"
#include "worker/worker_internal.h"

namespace pare::worker {

namespace fs = std::filesystem;

Worker::Worker(WorkerOptions options) : options_(std::move(options)) {
  if (options_.id.empty()) {
    char host[256] = {0};
    ::gethostname(host, sizeof host - 1);
    options_.id = std::string(host) + "-" + std::to_string(::getpid());
  }
  auto channel = MakeChannel(options_.server, options_.tls);
  if (!channel.ok()) throw std::invalid_argument(channel.status().message());
  stub_ = v1::Workers::NewStub(channel.value());
}

std::unique_ptr<grpc::ClientContext> Worker::Context(double seconds) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
  return ctx;
}

int Worker::Run() {
  // Jobs run in their own processes, which set these again; here they check the flags at start-up.
  const engine::ThreadChoice threads =
      engine::InitProcess(options_.threads, options_.quantized_engine, options_.cpu_share);
  has_cuda_ = CudaAvailable();
  device_name_ = DeviceName(has_cuda_);
  spdlog::info(Kv({{"msg", "worker started"},
                   {"worker", options_.id},
                   {"server", options_.server},
                   {"cuda", has_cuda_ ? "true" : "false"},
                   {"device", device_name_},
                   {"libtorch", LibTorchVersion()},
                   {"blas", engine::BlasName()},
                   {"threads", std::to_string(threads.threads)},
                   {"threads_why", threads.why}}));
  int failures = 0;
  while (!stop_) {
    v1::LeaseRequest req;
    req.set_worker_id(options_.id);
    req.mutable_capabilities()->set_cuda(has_cuda_);
    req.mutable_capabilities()->set_device_name(device_name_);
    v1::LeaseResponse resp;
    auto ctx = Context(10);
    grpc::Status st = stub_->Lease(ctx.get(), req, &resp);
    if (!st.ok()) {
      // The server may be starting or restarting: back off, up to 5 s.
      ++failures;
      if (failures == 1 || failures % 20 == 0) {
        spdlog::warn(Kv({{"msg", "lease failed"}, {"error", st.error_message()}}));
      }
      std::this_thread::sleep_for(
          RetryDelay(failures, std::chrono::milliseconds(100), std::chrono::seconds(5)));
      continue;
    }
    failures = 0;
    if (!resp.has_job()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(options_.poll_ms));
      continue;
    }
    RunJob(resp.job());
    if (options_.once) break;
  }
  spdlog::info(Kv({{"msg", "worker stopping"}, {"worker", options_.id}}));
  return 0;
}

namespace {

// A running job's heartbeat: every `period` it sends the job's progress and learns whether the
// job was cancelled or its lease lost; a new checkpoint is sent at once. Stops (and joins) when
// destroyed.
class Heartbeat {
 public:
  Heartbeat(v1::Workers::Stub* stub, const v1::LeasedJob& job, double period_seconds,
            std::function<std::unique_ptr<grpc::ClientContext>()> context)
      : thread_([this, stub, &job, period_seconds, context] {
          std::unique_lock<std::mutex> lock(mu_);
          while (!done_) {
            cv_.wait_for(lock, std::chrono::milliseconds(static_cast<int64_t>(period_seconds * 1000)),
                         [this] { return done_ || !checkpoint_.empty(); });
            if (done_) break;
            v1::HeartbeatRequest req;
            req.set_job_id(job.job_id());
            req.set_lease_id(job.lease_id());
            *req.mutable_progress() = progress_;
            std::string sent;
            sent.swap(checkpoint_);
            req.set_checkpoint_json(sent);
            lock.unlock();
            v1::HeartbeatResponse resp;
            auto ctx = context();
            const bool ok = stub->Heartbeat(ctx.get(), req, &resp).ok();
            if (ok) {
              if (!resp.lease_valid()) lease_lost_ = true;
              if (resp.cancelled()) cancelled_ = true;
            }
            lock.lock();
            if (!ok && checkpoint_.empty()) checkpoint_ = sent;  // tried again at the next beat
            if (!ok && !sent.empty())
              cv_.wait_for(lock, std::chrono::milliseconds(static_cast<int64_t>(period_seconds * 1000)));
          }
        }) {}
  ~Heartbeat() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  void SetProgress(const v1::Progress& p) {
    std::lock_guard<std::mutex> lock(mu_);
    progress_ = p;
  }
  // The job's checkpoint (JSON), sent with the next heartbeat, which goes at once.
  void SetCheckpoint(std::string checkpoint) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      checkpoint_ = std::move(checkpoint);
    }
    cv_.notify_all();
  }
  std::string Step() {
    std::lock_guard<std::mutex> lock(mu_);
    return progress_.step();
  }
  bool cancelled() const { return cancelled_; }
  bool lease_lost() const { return lease_lost_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  v1::Progress progress_;   // guarded by mu_
  std::string checkpoint_;  // guarded by mu_; not yet sent
  bool done_ = false;       // guarded by mu_
  std::atomic<bool> cancelled_{false}, lease_lost_{false};
  std::thread thread_;  // last: it starts once the rest is built
};

// A fresh folder for one job under `work_dir`; "" when it cannot be made.
std::string MakeJobFolder(const std::string& work_dir) {
  std::string dir_template = work_dir + "/pare-job-XXXXXX";
  std::vector<char> buf(dir_template.begin(), dir_template.end());
  buf.push_back('\0');
  return ::mkdtemp(buf.data()) ? std::string(buf.data()) : std::string();
}

// Passes the job process's progress lines on to the heartbeat, and logs each step's start once.
class ProgressRelay {
 public:
  ProgressRelay(const v1::LeasedJob& job, Heartbeat* heartbeat) : job_(job), heartbeat_(heartbeat) {}

  void operator()(const nlohmann::json& u) {
    if (u.contains("checkpoint")) {
      heartbeat_->SetCheckpoint(u["checkpoint"].dump());
      return;
    }
    const std::string step = u.value("step", "");
    if (step != logged_step_) {
      logged_step_ = step;
      spdlog::info(Kv({{"msg", "step started"},
                       {"job", job_.job_id()},
                       {"model", job_.model_id()},
                       {"step", step},
                       {"index", std::to_string(u.value("index", 0))}}));
    }
    v1::Progress p;
    p.set_step_index(u.value("index", 0));
    p.set_step_count(u.value("count", 0));
    p.set_step(step);
    p.set_fraction(u.value("fraction", 0.0f));
    p.set_message(u.value("message", ""));
    heartbeat_->SetProgress(p);
  }

 private:
  const v1::LeasedJob& job_;
  Heartbeat* heartbeat_;
  std::string logged_step_;
};

}  // namespace

void SetJobError(v1::CompleteHeader& header, v1::JobState state, const std::string& code,
                 const std::string& reason, const std::string& message) {
  header.set_state(state);
  header.mutable_error()->set_code(code);
  header.mutable_error()->set_reason(reason);
  header.mutable_error()->set_message(message);
}

std::string Worker::PrepareJobFolder(const v1::LeasedJob& job, const std::string& dir) {
  // Inputs are fetched and checked here; the model is loaded and the data parsed only by the
  // job's own sandboxed process (RunJobChild).
  auto fetch = [&](const std::string& sha, const std::string& path) {
    Status fetched = Fetch(job, sha, path);
    if (!fetched.ok()) throw engine::EngineError(fetched.code(), kReasonFetchFailed, fetched.message());
  };
  nlohmann::json spec;
  spec["model"] = dir + "/model.pt";
  fetch(job.model_sha256(), spec["model"]);
  for (const auto& d : job.datasets()) {
    const std::string blob = dir + "/" + d.role() + ".data";
    fetch(d.sha256(), blob);
    auto input = PrepareDataset(blob, d.format(), dir + "/" + d.role());
    if (!input.ok()) {
      throw engine::EngineError(input.status().code(), "BAD_DATASET",
                                d.role() + " dataset: " + input.status().message());
    }
    spec["datasets"][d.role()] = {{"format", input->format}, {"path", input->path}};
  }
  for (const auto& other : job.models()) {
    if (spec["models"].contains(other.id())) continue;
    const std::string path = dir + "/model-" + std::to_string(spec["models"].size()) + ".pt";
    fetch(other.sha256(), path);
    spec["models"][other.id()] = path;
  }
  const std::string result_path = dir + "/result.pt";
  spec["result"] = result_path;
  spec["latency_batches"] = options_.latency_batches;
  spec["latency_budget"] = options_.latency_budget_seconds;
  if (options_.latency_cache) {
    spec["latency_cache_dir"] = options_.work_dir + "/latency-cache";
    spec["model_digest"] = job.model_sha256();
  }
  spec["threads"] = options_.threads;
  spec["cpu_share"] = options_.cpu_share;
  spec["quantized_engine"] = options_.quantized_engine;
  spec["worker"] = options_.id;
  spec["device_name"] = device_name_;
  WriteFileChecked("the job's spec", dir + "/spec.json", spec.dump());
  std::string job_pb;
  if (!job.SerializeToString(&job_pb))
    throw engine::EngineError(Code::kInternal, "WORKER", "cannot encode the job");
  WriteFileChecked("the job", dir + "/job.pb", job_pb);
  return result_path;
}

void Worker::RunJob(const v1::LeasedJob& job) {
  const std::string& job_id = job.job_id();
  spdlog::info(Kv({{"msg", "job started"},
                   {"job", job_id},
                   {"model", job.model_id()},
                   {"step", "original"},
                   {"attempt", std::to_string(job.attempt())}}));
  const std::string dir = MakeJobFolder(options_.work_dir);
  if (dir.empty()) {
    v1::CompleteHeader h;
    SetJobError(h, v1::FAILED, "INTERNAL", kReasonWorkerDisk,
                "the worker cannot create a job folder under " + options_.work_dir);
    Complete(job, h, "");
    return;
  }
  auto heartbeat = std::make_unique<Heartbeat>(stub_.get(), job, options_.heartbeat_seconds,
                                               [this] { return Context(5); });

  // After SIGTERM the job has half the drain grace to finish; then it is handed back, which
  // leaves time to tell the server before the supervisor's grace runs out.
  auto drain_deadline = SteadyClock::time_point::max();  // only touched by the engine's thread
  std::atomic<bool> handed_back{false};
  auto should_stop = [&] {
    if (stop_ && !handed_back) {
      auto now = SteadyClock::now();
      if (drain_deadline == SteadyClock::time_point::max()) {
        drain_deadline = now + std::chrono::milliseconds(static_cast<int64_t>(options_.drain_seconds * 500));
      }
      if (now >= drain_deadline) handed_back = true;
    }
    return heartbeat->cancelled() || heartbeat->lease_lost() || handed_back;
  };
  ProgressRelay on_progress(job, heartbeat.get());

  v1::CompleteHeader header;
  std::string result_path;
  try {
    auto steps = ToEngineSteps(job.recipe());
    if (!steps.ok())
      throw engine::EngineError(steps.status().code(), engine::kReasonBadRecipe, steps.status().message());
    result_path = PrepareJobFolder(job, dir);
    // CUDA reserves far more address space than it uses: no RLIMIT_AS for GPU jobs.
    const bool cuda_job = has_cuda_ && job.device() != "cpu";
    // The job's own limit, within this worker's.
    double timeout = options_.job_timeout_seconds;
    if (job.timeout_seconds() > 0 && (timeout <= 0 || job.timeout_seconds() < timeout))
      timeout = job.timeout_seconds();
    header =
        RunSandboxed(dir, cuda_job, timeout, on_progress, should_stop, [&] { return heartbeat->Step(); });
    if (header.state() == v1::QUEUED && (!handed_back || heartbeat->cancelled())) {
      // The job process stopped on request: a cancel, unless it was a hand-back.
      SetJobError(header, v1::CANCELLED, "CANCELLED", "CANCELLED", "cancelled while running");
    }
  } catch (const engine::EngineError& e) {
    // A job whose inputs could not be fetched because the server was away is handed back.
    SetJobError(header, e.reason() == kReasonServerUnreachable ? v1::QUEUED : v1::FAILED, CodeName(e.code()),
                e.reason(), e.what());
  } catch (const std::exception& e) {
    SetJobError(header, v1::FAILED, "INTERNAL", "ENGINE", e.what());
  }
  // A FAILED job may keep its result (an auto search's closest model).
  if (header.result_size_bytes() == 0) result_path.clear();
  const std::string step = heartbeat->Step();
  const bool lease_lost = heartbeat->lease_lost();
  // The heartbeat goes on while the outcome is sent: a large result stored by the server (into
  // PostgreSQL, say) may take longer than the lease, which must not expire meanwhile.
  if (lease_lost) {
    spdlog::warn(Kv({{"msg", "lease lost; dropping the job"},
                     {"job", job_id},
                     {"model", job.model_id()},
                     {"step", step}}));
  } else {
    Complete(job, header, result_path);
    heartbeat.reset();
    spdlog::info(Kv({{"msg", "job finished"},
                     {"job", job_id},
                     {"model", job.model_id()},
                     {"step", step},
                     {"state", v1::JobState_Name(header.state())},
                     {"reason", header.error().reason()}}));
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

}  // namespace pare::worker
