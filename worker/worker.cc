#include "worker/worker.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <thread>

#include "common/logging.h"
#include "common/recipe_convert.h"
#include "common/sha256.h"
#include "worker/dataset_files.h"
#include "worker/engine/engine.h"
#include "worker/engine/error.h"
#include "worker/torch_info.h"

namespace pare::worker {
namespace {

namespace fs = std::filesystem;
using SteadyClock = std::chrono::steady_clock;

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

}  // namespace

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
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
  return ctx;
}

int Worker::Run() {
  // Jobs run in their own processes, which set these again; here they check the flags at start-up.
  const engine::ThreadChoice threads = engine::InitProcess(options_.threads, options_.quantized_engine);
  has_cuda_ = CudaAvailable();
  device_name_ = DeviceName(has_cuda_);
  spdlog::info(Kv({{"msg", "worker started"}, {"worker", options_.id}, {"server", options_.server},
                   {"cuda", has_cuda_ ? "true" : "false"}, {"device", device_name_},
                   {"libtorch", LibTorchVersion()}, {"blas", engine::BlasName()},
                   {"threads", std::to_string(threads.threads)}, {"threads_why", threads.why}}));
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
      std::this_thread::sleep_for(std::chrono::milliseconds(std::min(5000, 100 * failures)));
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

// Input fetches and result uploads: this many tries, waiting 0.5, 1, 2, 4 and 8 s between them
// (a server restarting, a network blip), then the job is handed back or the result given up.
constexpr int kTransferAttempts = 6;
static std::chrono::milliseconds TransferBackoff(int retry) {
  return std::chrono::milliseconds(int64_t{500} << std::min(std::max(retry - 1, 0), 5));
}

// A file the worker could not write (a full disk, a file size limit): the job fails with
// WORKER_DISK and the reason, rather than run on a short file.
[[noreturn]] static void DiskError(const std::string& what, const std::string& path, int err) {
  throw engine::EngineError(Code::kInternal, "WORKER_DISK",
                            "the worker cannot write " + what + " to " + path + ": " + std::strerror(err));
}

// Writes `text` to `path`, checked to the end (close included).
static void WriteFileChecked(const std::string& what, const std::string& path, const std::string& text) {
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (out) out.write(text.data(), static_cast<std::streamsize>(text.size()));
  if (out) out.close();
  if (!out) DiskError(what, path, errno ? errno : EIO);
}

bool Worker::Fetch(const v1::LeasedJob& job, const std::string& sha, const std::string& path, std::string* error) {
  // Resumes from what was written if the stream breaks, a few times, waiting longer each time.
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) DiskError("input " + sha, path, errno ? errno : EIO);
  uint64_t have = 0;
  Sha256 hash;  // over the bytes written, in order
  for (int attempt = 0; attempt < kTransferAttempts; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(TransferBackoff(attempt));
    v1::FetchRequest req;
    req.set_job_id(job.job_id());
    req.set_lease_id(job.lease_id());
    req.set_sha256(sha);
    req.set_offset(have);
    auto ctx = Context(600);
    auto reader = stub_->Fetch(ctx.get(), req);
    v1::Chunk chunk;
    while (reader->Read(&chunk)) {
      errno = 0;
      if (!out.write(chunk.data().data(), static_cast<std::streamsize>(chunk.data().size())) || !out.flush()) {
        const int err = errno ? errno : EIO;
        ctx->TryCancel();
        reader->Finish();
        DiskError("input " + sha, path, err);
      }
      hash.Update(chunk.data().data(), chunk.data().size());
      have += chunk.data().size();
    }
    grpc::Status st = reader->Finish();
    if (st.ok()) {
      errno = 0;
      out.close();
      if (!out) DiskError("input " + sha, path, errno ? errno : EIO);
      std::string got = hash.HexDigest();
      if (got != sha) {
        *error = "input " + sha + " arrived with digest " + got;
        return false;
      }
      return true;
    }
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE && st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      *error = "fetching input " + sha + ": " + st.error_message();
      return false;
    }
    spdlog::warn(Kv({{"msg", "fetching an input failed; retrying"}, {"job", job.job_id()}, {"sha256", sha},
                     {"attempt", std::to_string(attempt + 1)}, {"have", std::to_string(have)},
                     {"error", st.error_message()}}));
  }
  // The server is unreachable (restarting?): the job goes back to the queue, not to FAILED.
  throw engine::EngineError(Code::kUnavailable, "SERVER_UNREACHABLE",
                            "fetching input " + sha + " kept failing: the server is unreachable");
}

void Worker::Complete(const v1::LeasedJob& job, v1::CompleteHeader header, const std::string& result_path) {
  header.set_job_id(job.job_id());
  header.set_lease_id(job.lease_id());
  for (int attempt = 0; attempt < kTransferAttempts; ++attempt) {
    auto ctx = Context(600);
    v1::CompleteResponse resp;
    auto writer = stub_->Complete(ctx.get(), &resp);
    v1::CompleteRequest req;
    *req.mutable_header() = header;
    bool ok = writer->Write(req);
    if (ok && !result_path.empty()) {
      std::ifstream in(result_path, std::ios::binary);
      std::string buf(1 << 20, '\0');
      while (ok && in) {
        in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        auto n = in.gcount();
        if (n <= 0) break;
        v1::CompleteRequest c;
        c.set_chunk(buf.data(), static_cast<size_t>(n));
        ok = writer->Write(c);
      }
    }
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    if (st.ok()) return;
    spdlog::warn(Kv({{"msg", "reporting the result failed"}, {"job", job.job_id()}, {"error", st.error_message()}}));
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE && st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED &&
        st.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) {
      return;  // e.g. the lease moved on: the result is not ours to give any more
    }
    std::this_thread::sleep_for(TransferBackoff(attempt + 1));
  }
}

void Worker::RunJob(const v1::LeasedJob& job) {
  const std::string& job_id = job.job_id();
  spdlog::info(Kv({{"msg", "job started"}, {"job", job_id}, {"model", job.model_id()}, {"step", "original"},
                   {"attempt", std::to_string(job.attempt())}}));
  std::string dir_template = options_.work_dir + "/pare-job-XXXXXX";
  std::vector<char> buf(dir_template.begin(), dir_template.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) {
    v1::CompleteHeader h;
    h.set_state(v1::FAILED);
    h.mutable_error()->set_code("INTERNAL");
    h.mutable_error()->set_reason("WORKER_DISK");
    h.mutable_error()->set_message("the worker cannot create a job folder under " + options_.work_dir);
    Complete(job, h, "");
    return;
  }
  const std::string dir = buf.data();

  // Shared with the heartbeat thread.
  std::mutex mu;
  std::condition_variable cv;
  v1::Progress progress;  // guarded by mu
  bool done = false;      // guarded by mu
  std::atomic<bool> cancelled{false}, lease_lost{false}, handed_back{false};
  // After SIGTERM the job has half the drain grace to finish; then it is handed back, which
  // leaves time to tell the server before the supervisor's grace runs out.
  auto drain_deadline = SteadyClock::time_point::max();  // only touched by the engine's thread
  auto should_stop = [&] {
    if (stop_ && !handed_back) {
      auto now = SteadyClock::now();
      if (drain_deadline == SteadyClock::time_point::max()) {
        drain_deadline = now + std::chrono::milliseconds(static_cast<int64_t>(options_.drain_seconds * 500));
      }
      if (now >= drain_deadline) handed_back = true;
    }
    return cancelled || lease_lost || handed_back;
  };
  std::thread heartbeat([&] {
    std::unique_lock<std::mutex> lock(mu);
    while (!done) {
      cv.wait_for(lock, std::chrono::milliseconds(static_cast<int64_t>(options_.heartbeat_seconds * 1000)));
      if (done) break;
      v1::HeartbeatRequest req;
      req.set_job_id(job_id);
      req.set_lease_id(job.lease_id());
      *req.mutable_progress() = progress;
      lock.unlock();
      v1::HeartbeatResponse resp;
      auto ctx = Context(5);
      grpc::Status st = stub_->Heartbeat(ctx.get(), req, &resp);
      if (st.ok()) {
        if (!resp.lease_valid()) lease_lost = true;
        if (resp.cancelled()) cancelled = true;
      }
      lock.lock();
    }
  });
  auto finish_heartbeat = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      done = true;
    }
    cv.notify_all();
    heartbeat.join();
  };

  v1::CompleteHeader header;
  std::string result_path;
  try {
    auto steps = ToEngineSteps(job.recipe());
    if (!steps.ok()) throw engine::EngineError(steps.status().code(), "BAD_RECIPE", steps.status().message());
    // Inputs are fetched and checked here; the model is loaded and the data parsed only by
    // the job's own sandboxed process (RunJobChild).
    std::string error;
    nlohmann::json spec;
    spec["model"] = dir + "/model.pt";
    if (!Fetch(job, job.model_sha256(), spec["model"], &error)) {
      throw engine::EngineError(Code::kUnavailable, "FETCH_FAILED", error);
    }
    for (const auto& d : job.datasets()) {
      const std::string blob = dir + "/" + d.role() + ".data";
      if (!Fetch(job, d.sha256(), blob, &error)) throw engine::EngineError(Code::kUnavailable, "FETCH_FAILED", error);
      auto input = PrepareDataset(blob, d.format(), dir + "/" + d.role());
      if (!input.ok()) {
        throw engine::EngineError(input.status().code(), "BAD_DATASET", d.role() + " dataset: " + input.status().message());
      }
      spec["datasets"][d.role()] = {{"format", input->format}, {"path", input->path}};
    }
    for (const auto& other : job.models()) {
      if (spec["models"].contains(other.id())) continue;
      const std::string path = dir + "/model-" + std::to_string(spec["models"].size()) + ".pt";
      if (!Fetch(job, other.sha256(), path, &error)) throw engine::EngineError(Code::kUnavailable, "FETCH_FAILED", error);
      spec["models"][other.id()] = path;
    }
    result_path = dir + "/result.pt";
    spec["result"] = result_path;
    spec["latency_batches"] = options_.latency_batches;
    spec["latency_budget"] = options_.latency_budget_seconds;
    if (options_.latency_cache) {
      spec["latency_cache_dir"] = options_.work_dir + "/latency-cache";
      spec["model_digest"] = job.model_sha256();
    }
    spec["threads"] = options_.threads;
    spec["quantized_engine"] = options_.quantized_engine;
    spec["worker"] = options_.id;
    spec["device_name"] = device_name_;
    WriteFileChecked("the job's spec", dir + "/spec.json", spec.dump());
    std::string job_pb;
    if (!job.SerializeToString(&job_pb)) throw engine::EngineError(Code::kInternal, "WORKER", "cannot encode the job");
    WriteFileChecked("the job", dir + "/job.pb", job_pb);
    std::string logged_step;
    auto on_progress = [&](const nlohmann::json& u) {
      const std::string step = u.value("step", "");
      if (step != logged_step) {
        logged_step = step;
        spdlog::info(Kv({{"msg", "step started"}, {"job", job_id}, {"model", job.model_id()}, {"step", step},
                         {"index", std::to_string(u.value("index", 0))}}));
      }
      std::lock_guard<std::mutex> lock(mu);
      progress.set_step_index(u.value("index", 0));
      progress.set_step_count(u.value("count", 0));
      progress.set_step(step);
      progress.set_fraction(u.value("fraction", 0.0f));
      progress.set_message(u.value("message", ""));
    };
    // CUDA reserves far more address space than it uses: no RLIMIT_AS for GPU jobs.
    const bool cuda_job = has_cuda_ && job.device() != "cpu";
    // The job's own limit, within this worker's.
    double timeout = options_.job_timeout_seconds;
    if (job.timeout_seconds() > 0 && (timeout <= 0 || job.timeout_seconds() < timeout)) timeout = job.timeout_seconds();
    header = RunSandboxed(dir, cuda_job, timeout, on_progress, should_stop, [&] {
      std::lock_guard<std::mutex> lock(mu);
      return progress.step();
    });
    if (header.state() == v1::QUEUED) {  // the job process stopped on request
      header.set_state(handed_back && !cancelled ? v1::QUEUED : v1::CANCELLED);
      if (header.state() == v1::CANCELLED) {
        header.mutable_error()->set_code("CANCELLED");
        header.mutable_error()->set_reason("CANCELLED");
        header.mutable_error()->set_message("cancelled while running");
      }
    }
    if (header.state() != v1::SUCCEEDED) result_path.clear();
  } catch (const engine::EngineError& e) {
    // A job whose inputs could not be fetched because the server was away is handed back.
    header.set_state(e.reason() == "SERVER_UNREACHABLE" ? v1::QUEUED : v1::FAILED);
    header.mutable_error()->set_code(CodeName(e.code()));
    header.mutable_error()->set_reason(e.reason());
    header.mutable_error()->set_message(e.what());
    result_path.clear();
  } catch (const std::exception& e) {
    header.set_state(v1::FAILED);
    header.mutable_error()->set_code("INTERNAL");
    header.mutable_error()->set_reason("ENGINE");
    header.mutable_error()->set_message(e.what());
    result_path.clear();
  }
  finish_heartbeat();
  if (lease_lost) {
    spdlog::warn(Kv({{"msg", "lease lost; dropping the job"}, {"job", job_id}, {"model", job.model_id()},
                     {"step", progress.step()}}));
  } else {
    Complete(job, header, result_path);
    spdlog::info(Kv({{"msg", "job finished"}, {"job", job_id}, {"model", job.model_id()}, {"step", progress.step()},
                     {"state", v1::JobState_Name(header.state())}, {"reason", header.error().reason()}}));
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

namespace {

std::atomic<bool> g_child_stop{false};
void OnChildStop(int) { g_child_stop = true; }

bool OutOfMemory(const std::string& message) {
  return message.find("can't allocate memory") != std::string::npos || message.find("not enough memory") != std::string::npos ||
         message.find("std::bad_alloc") != std::string::npos || message.find("out of memory") != std::string::npos;
}

std::string SignalName(int sig) {
  const char* d = ::sigdescr_np(sig);
  std::string name = ::sigabbrev_np(sig) ? std::string("SIG") + ::sigabbrev_np(sig) : "signal " + std::to_string(sig);
  return d ? name + " (" + d + ")" : name;
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
    engine::InitProcess(spec.value("threads", 0), spec.value("quantized_engine", ""));
    auto steps = ToEngineSteps(job.recipe());
    if (!steps.ok()) throw engine::EngineError(steps.status().code(), "BAD_RECIPE", steps.status().message());
    engine::CompressOptions opts;
    opts.device = job.device();
    opts.input_shape.assign(job.input_shape().begin(), job.input_shape().end());
    for (const auto& more : job.more_input_shapes()) opts.more_input_shapes.emplace_back(more.dims().begin(), more.dims().end());
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
    opts.progress = [&](const engine::ProgressUpdate& u) {
      if (u.fraction >= 0) {
        nlohmann::json line = {{"index", u.step_index}, {"count", u.step_count}, {"step", u.step},
                               {"fraction", u.fraction}, {"message", u.message}};
        std::cout << line.dump() << std::endl;
      }
      return !g_child_stop;
    };
    engine::Report report = engine::Compress(spec["model"], steps.value(), opts, result_path);
    nlohmann::json j = engine::ToJson(report);
    j["job_id"] = job.job_id();
    j["worker"] = spec.value("worker", "");
    j["libtorch"] = LibTorchVersion();
    j["device_name"] = spec.value("device_name", "");
    header.set_state(v1::SUCCEEDED);
    header.set_report_json(j.dump(2));
    for (const auto& s : report.steps) *header.add_reports() = ToProto(s);
    header.set_result_size_bytes(fs::file_size(result_path));
    header.set_result_sha256(Sha256OfFile(result_path));
  } catch (const engine::Cancelled&) {
    return 3;
  } catch (const engine::EngineError& e) {
    header.set_state(v1::FAILED);
    header.mutable_error()->set_code(CodeName(e.code()));
    header.mutable_error()->set_reason(e.reason());
    header.mutable_error()->set_message(e.what());
  } catch (const std::exception& e) {
    header.set_state(v1::FAILED);
    header.mutable_error()->set_code("INTERNAL");
    header.mutable_error()->set_reason("ENGINE");
    header.mutable_error()->set_message(e.what());
  }
  if (header.state() == v1::FAILED && OutOfMemory(header.error().message())) {
    header.mutable_error()->set_code("RESOURCE_EXHAUSTED");
    header.mutable_error()->set_reason("JOB_MEMORY_LIMIT");
    header.mutable_error()->set_message("the job ran out of memory (the worker's limit or the machine's): " +
                                        header.error().message());
  }
  std::ofstream out(dir + "/outcome.pb", std::ios::binary);
  if (!header.SerializeToOstream(&out)) return 2;
  out.close();
  return out ? 0 : 2;  // the worker reports a child that could not say how it ended
}

v1::CompleteHeader Worker::RunSandboxed(const std::string& dir, bool cuda_job, double timeout_seconds,
                                        const std::function<void(const nlohmann::json&)>& on_progress,
                                        const std::function<bool()>& should_stop,
                                        const std::function<std::string()>& current_step) {
  // Everything the child needs between fork and exec is prepared here: only
  // async-signal-safe calls may follow fork in a threaded process.
  std::error_code ec;
  const std::string self = fs::read_symlink("/proc/self/exe", ec).string();
  if (ec) throw engine::EngineError(Code::kInternal, "WORKER", "cannot find the pare-worker executable");
  std::vector<std::string> args = {self, "--run-job", dir};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw engine::EngineError(Code::kInternal, "WORKER", "pipe failed");
  const rlim_t memory = options_.job_memory_mb > 0 && !cuda_job ? rlim_t(options_.job_memory_mb) << 20 : RLIM_INFINITY;
  const rlim_t cpu = options_.job_cpu_seconds > 0 ? rlim_t(options_.job_cpu_seconds) : RLIM_INFINITY;
  const rlim_t files = options_.job_max_open_files > 0 ? rlim_t(options_.job_max_open_files) : RLIM_INFINITY;
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    throw engine::EngineError(Code::kInternal, "WORKER", "fork failed");
  }
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct rlimit r;
    r.rlim_cur = r.rlim_max = memory;
    ::setrlimit(RLIMIT_AS, &r);
    r.rlim_cur = cpu;
    r.rlim_max = cpu == RLIM_INFINITY ? RLIM_INFINITY : cpu + 5;
    ::setrlimit(RLIMIT_CPU, &r);
    r.rlim_cur = r.rlim_max = files;
    ::setrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max = 0;
    ::setrlimit(RLIMIT_CORE, &r);
    if (::chdir(dir.c_str()) != 0) ::_exit(126);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  const auto start = SteadyClock::now();
  auto term_sent = SteadyClock::time_point::max();
  bool timed_out = false, killed_by_us = false;
  std::string pending;
  char buf[4096];
  while (true) {
    pollfd p{fds[0], POLLIN, 0};
    int r = ::poll(&p, 1, 200);
    if (r > 0) {
      ssize_t n = ::read(fds[0], buf, sizeof buf);
      if (n <= 0) break;  // the child closed stdout: it ended
      pending.append(buf, static_cast<size_t>(n));
      for (auto nl = pending.find('\n'); nl != std::string::npos; nl = pending.find('\n')) {
        std::string line = pending.substr(0, nl);
        pending.erase(0, nl + 1);
        try {
          on_progress(nlohmann::json::parse(line));
        } catch (const std::exception&) {
          // Not a progress line (a model printing to stdout): ignore it.
        }
      }
    }
    const auto now = SteadyClock::now();
    if (term_sent == SteadyClock::time_point::max() && should_stop()) {
      ::kill(pid, SIGTERM);
      term_sent = now;
    }
    if (term_sent != SteadyClock::time_point::max() && now - term_sent > std::chrono::seconds(15) && !killed_by_us) {
      ::kill(pid, SIGKILL);  // it did not stop at the next progress point
      killed_by_us = true;
    }
    if (timeout_seconds > 0 && !timed_out &&
        now - start > std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000))) {
      ::kill(pid, SIGKILL);
      timed_out = killed_by_us = true;
    }
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  v1::CompleteHeader header;
  auto fail = [&](const std::string& code, const std::string& reason, const std::string& message) {
    header.set_state(v1::FAILED);
    header.mutable_error()->set_code(code);
    header.mutable_error()->set_reason(reason);
    header.mutable_error()->set_message(message);
    return header;
  };
  const std::string step = current_step().empty() ? "loading" : current_step();
  if (timed_out) {
    return fail("DEADLINE_EXCEEDED", "JOB_TIMEOUT",
                "the job ran longer than its limit of " + std::to_string(int(timeout_seconds)) + " s (during " +
                    step + ") and was stopped");
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 3) {
    header.set_state(v1::QUEUED);
    return header;
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    std::ifstream in(dir + "/outcome.pb", std::ios::binary);
    if (header.ParseFromIstream(&in)) return header;
    return fail("INTERNAL", "JOB_CRASHED", "the job process ended without an outcome");
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    // Stopped on our request: killed after the grace, or a SIGTERM that came before the job
    // process had set its handler (a cancel right after the lease).
    if (killed_by_us || (sig == SIGTERM && term_sent != SteadyClock::time_point::max())) {
      header.set_state(v1::QUEUED);
      return header;
    }
    if (sig == SIGXCPU) {
      return fail("RESOURCE_EXHAUSTED", "JOB_CPU_LIMIT",
                  "the job used more than this worker's CPU-time limit of " + std::to_string(options_.job_cpu_seconds) +
                      " s (during " + step + ")");
    }
    if (sig == SIGKILL) {
      return fail("RESOURCE_EXHAUSTED", "JOB_KILLED",
                  "the job process was killed (SIGKILL) during " + step +
                      "; most often the kernel's out-of-memory killer: the model or its data needs more memory");
    }
    return fail("INTERNAL", "JOB_CRASHED",
                "the job process crashed with " + SignalName(sig) + " during " + step +
                    "; the model or its data made LibTorch fail. The worker is unaffected");
  }
  return fail("INTERNAL", "JOB_CRASHED",
              "the job process exited with code " + std::to_string(WEXITSTATUS(status)) + " during " + step);
}

}  // namespace pare::worker
