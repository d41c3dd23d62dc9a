#include "worker/worker.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
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
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(4 << 20);
  stub_ = v1::Workers::NewStub(grpc::CreateCustomChannel(options_.server, grpc::InsecureChannelCredentials(), args));
}

std::unique_ptr<grpc::ClientContext> Worker::Context(double seconds) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
  return ctx;
}

int Worker::Run() {
  engine::InitProcess(options_.threads, options_.quantized_engine);
  has_cuda_ = CudaAvailable();
  device_name_ = DeviceName(has_cuda_);
  spdlog::info(Kv({{"msg", "worker started"}, {"worker", options_.id}, {"server", options_.server},
                   {"cuda", has_cuda_ ? "true" : "false"}, {"device", device_name_},
                   {"libtorch", LibTorchVersion()}}));
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

bool Worker::Fetch(const v1::LeasedJob& job, const std::string& sha, const std::string& path, std::string* error) {
  // Resumes from what arrived if the stream breaks, a few times.
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  uint64_t have = 0;
  Sha256 hash;
  for (int attempt = 0; attempt < 5; ++attempt) {
    v1::FetchRequest req;
    req.set_job_id(job.job_id());
    req.set_lease_id(job.lease_id());
    req.set_sha256(sha);
    req.set_offset(have);
    auto ctx = Context(600);
    auto reader = stub_->Fetch(ctx.get(), req);
    v1::Chunk chunk;
    while (reader->Read(&chunk)) {
      out.write(chunk.data().data(), static_cast<std::streamsize>(chunk.data().size()));
      hash.Update(chunk.data().data(), chunk.data().size());
      have += chunk.data().size();
    }
    grpc::Status st = reader->Finish();
    if (st.ok()) {
      out.close();
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
  }
  *error = "fetching input " + sha + " kept failing";
  return false;
}

void Worker::Complete(const v1::LeasedJob& job, v1::CompleteHeader header, const std::string& result_path) {
  header.set_job_id(job.job_id());
  header.set_lease_id(job.lease_id());
  for (int attempt = 0; attempt < 5; ++attempt) {
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
    std::this_thread::sleep_for(std::chrono::seconds(1 << attempt));
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
    std::string error;
    const std::string model_path = dir + "/model.pt";
    if (!Fetch(job, job.model_sha256(), model_path, &error)) {
      throw engine::EngineError(Code::kUnavailable, "FETCH_FAILED", error);
    }
    engine::CompressOptions opts;
    opts.device = job.device();
    opts.input_shape.assign(job.input_shape().begin(), job.input_shape().end());
    opts.latency_batches = options_.latency_batches;
    opts.latency_budget_seconds = options_.latency_budget_seconds;
    for (const auto& d : job.datasets()) {
      const std::string blob = dir + "/" + d.role() + ".data";
      if (!Fetch(job, d.sha256(), blob, &error)) throw engine::EngineError(Code::kUnavailable, "FETCH_FAILED", error);
      auto input = PrepareDataset(blob, d.format(), dir + "/" + d.role());
      if (!input.ok()) {
        throw engine::EngineError(input.status().code(), "BAD_DATASET", d.role() + " dataset: " + input.status().message());
      }
      if (d.role() == "calibration") opts.calibration = input.value();
      if (d.role() == "train") opts.train = input.value();
      if (d.role() == "eval") opts.eval = input.value();
    }
    std::string logged_step;
    opts.progress = [&](const engine::ProgressUpdate& u) {
      if (u.fraction >= 0) {
        if (u.step != logged_step) {
          logged_step = u.step;
          spdlog::info(Kv({{"msg", "step started"}, {"job", job_id}, {"model", job.model_id()}, {"step", u.step},
                           {"index", std::to_string(u.step_index)}}));
        }
        std::lock_guard<std::mutex> lock(mu);
        progress.set_step_index(u.step_index);
        progress.set_step_count(u.step_count);
        progress.set_step(u.step);
        progress.set_fraction(static_cast<float>(u.fraction));
        progress.set_message(u.message);
      }
      return !should_stop();
    };
    result_path = dir + "/result.pt";
    for (const auto& other : job.models()) {
      if (opts.models.count(other.id())) continue;
      const std::string path = dir + "/model-" + std::to_string(opts.models.size()) + ".pt";
      if (!Fetch(job, other.sha256(), path, &error)) throw engine::EngineError(Code::kUnavailable, "FETCH_FAILED", error);
      opts.models[other.id()] = path;
    }
    engine::Report report = engine::Compress(model_path, steps.value(), opts, result_path);
    nlohmann::json j = engine::ToJson(report);
    j["job_id"] = job_id;
    j["worker"] = options_.id;
    j["libtorch"] = LibTorchVersion();
    j["device_name"] = device_name_;
    header.set_state(v1::SUCCEEDED);
    header.set_report_json(j.dump(2));
    for (const auto& s : report.steps) *header.add_reports() = ToProto(s);
    header.set_result_size_bytes(fs::file_size(result_path));
    header.set_result_sha256(Sha256OfFile(result_path));
  } catch (const engine::Cancelled&) {
    header.set_state(handed_back && !cancelled ? v1::QUEUED : v1::CANCELLED);
    if (header.state() == v1::CANCELLED) {
      header.mutable_error()->set_code("CANCELLED");
      header.mutable_error()->set_reason("CANCELLED");
      header.mutable_error()->set_message("cancelled while running");
    }
    result_path.clear();
  } catch (const engine::EngineError& e) {
    header.set_state(v1::FAILED);
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

}  // namespace pare::worker
