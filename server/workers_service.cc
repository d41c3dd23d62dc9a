#include "server/workers_service.h"

#include <chrono>
#include <cstdlib>
#include <thread>

#include "common/grpc_status.h"
#include "common/ids.h"
#include "common/logging.h"
#include "server/convert.h"
#include "server/job_end.h"
#include "server/reactors.h"
#include "worker/recipe_convert.h"

namespace pare::server {
namespace {

constexpr uint64_t kMaxReportBytes = 16 << 20;
constexpr uint64_t kMaxCheckpointBytes = 1 << 20;

// Builds what a worker needs to run a job; datasets and model are resolved to digests.
Result<v1::LeasedJob> Describe(ServiceContext* ctx, const JobRecord& j) {
  v1::LeasedJob out;
  out.set_job_id(j.id);
  out.set_lease_id(j.lease_id);
  if (!out.mutable_recipe()->ParseFromString(j.recipe_pb)) {
    return DataLoss("job '" + j.id + "': its stored recipe cannot be decoded");
  }
  PARE_ASSIGN_OR_RETURN(auto model, ctx->store->GetModel(j.tenant, j.model_id));
  out.set_model_sha256(model.sha256);
  out.set_model_id(j.model_id);
  out.set_timeout_seconds(static_cast<uint32_t>(j.timeout_seconds));
  out.set_checkpoint_json(j.checkpoint);
  for (const auto& [field, id] : ReferencedModels(out.recipe())) {
    PARE_ASSIGN_OR_RETURN(auto other, ctx->store->GetModel(j.tenant, id));
    auto* ref = out.add_models();
    ref->set_id(id);
    ref->set_sha256(other.sha256);
  }
  for (int64_t d : model.input_shape) out.add_input_shape(d);
  for (const auto& more : model.more_input_shapes) {
    auto* shape = out.add_more_input_shapes();
    for (int64_t d : more) shape->add_dims(d);
  }
  for (const auto& [role, id] : {std::pair<const char*, std::string>{"calibration", j.calibration_dataset_id},
                                 {"train", j.train_dataset_id},
                                 {"eval", j.eval_dataset_id}}) {
    if (id.empty()) continue;
    PARE_ASSIGN_OR_RETURN(auto ds, ctx->store->GetDataset(j.tenant, id));
    auto* ref = out.add_datasets();
    ref->set_role(role);
    ref->set_sha256(ds.sha256);
    ref->set_format(ds.format);
  }
  out.set_device(j.device);
  out.set_attempt(j.attempts);
  out.set_lease_ttl_seconds(static_cast<uint32_t>(ctx->limits.lease_ttl_ms / 1000));
  return out;
}

// The job's result: a header with the outcome and reports, then the model's chunks.
class CompleteReactor final : public IngestReactor<v1::CompleteRequest, v1::CompleteHeader> {
 public:
  explicit CompleteReactor(ServiceContext* ctx)
      : IngestReactor(ctx->executor, ctx->blobs), ctx_(ctx), start_(std::chrono::steady_clock::now()) {}

 protected:
  Status OnHeader(const v1::CompleteHeader& h, uint64_t* expected, uint64_t* limit) override {
    if (h.job_id().empty() || h.lease_id().empty())
      return InvalidArgument("job_id and lease_id are required");
    if (h.state() == v1::SUCCEEDED && h.result_size_bytes() == 0)
      return InvalidArgument("a SUCCEEDED job needs its result (result_size_bytes)");
    if (h.result_size_bytes() != 0 && h.state() != v1::SUCCEEDED && h.state() != v1::FAILED)
      return InvalidArgument("only a SUCCEEDED or FAILED job carries a result");
    if (h.report_json().size() > kMaxReportBytes) return InvalidArgument("report_json is too large");
    *expected = h.result_size_bytes();
    *limit = std::max<uint64_t>(h.result_size_bytes(), 1);
    return Status::Ok();
  }

  Status Finalize(const v1::CompleteHeader& h, BlobWriter* writer) override {
    // Test hook: a slow blob store (a large result going into PostgreSQL), PARE_TEST_COMPLETE_DELAY_MS
    // before the outcome is stored.
    if (const char* delay = std::getenv("PARE_TEST_COMPLETE_DELAY_MS"))
      std::this_thread::sleep_for(std::chrono::milliseconds(std::atoll(delay)));
    JobOutcome o;
    o.state = FromProto(h.state());
    // A FAILED job may keep what it made (an auto search's closest model and its report).
    if (h.result_size_bytes() != 0) {
      auto sha = writer->Commit(h.result_size_bytes(), h.result_sha256(), [this](const std::string& path) {
        return CheckTorchScriptArchive(path, ctx_->limits.archive);
      });
      if (!sha.ok()) return sha.status();
      PARE_ASSIGN_OR_RETURN(auto report, ctx_->blobs->PutBytes(h.report_json()));
      o.result_sha256 = sha.value();
      o.result_size_bytes = h.result_size_bytes();
      o.report_sha256 = report;
    } else if (h.state() != v1::FAILED && h.state() != v1::CANCELLED && h.state() != v1::QUEUED) {
      return InvalidArgument("state must be SUCCEEDED, FAILED, CANCELLED or QUEUED (handed back)");
    }
    o.error_code = h.error().code();
    o.error_reason = h.error().reason();
    o.error_message = h.error().message();
    v1::Job holder;
    *holder.mutable_reports() = h.reports();
    holder.SerializeToString(&o.reports_pb);
    PARE_ASSIGN_OR_RETURN(auto j,
                          ctx_->store->CompleteJob(h.job_id(), h.lease_id(), o, ctx_->clock->NowMs()));
    const std::string device = ctx_->workers ? ctx_->workers->DeviceOf(j.worker) : "";
    if (ctx_->workers) ctx_->workers->Touch(j.worker, false, ctx_->clock->NowMs());
    if (ctx_->metrics && h.state() == v1::SUCCEEDED)
      ctx_->metrics->Uploaded("result", h.result_size_bytes(), SecondsSince(start_));
    JobChanged(*ctx_, j, device);
    return Status::Ok();
  }

 private:
  ServiceContext* ctx_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

grpc::ServerUnaryReactor* WorkersService::Lease(grpc::CallbackServerContext* call,
                                                const v1::LeaseRequest* req, v1::LeaseResponse* resp) {
  if (Status st = ctx_->auth->Worker(call); !st.ok()) return Refuse(call, st);
  return RunUnary(ctx_->executor, call, [this, req, resp]() -> Status {
    if (req->worker_id().empty()) return InvalidArgument("worker_id is required");
    if (ctx_->draining) return Status::Ok();  // no new work while draining
    const int64_t now = ctx_->clock->NowMs();
    const std::string device_kind = req->capabilities().cuda() ? "cuda" : "cpu";
    auto leased = ctx_->store->LeaseJob(req->worker_id(), req->capabilities().cuda(), NewId("lease"), now,
                                        ctx_->limits.lease_ttl_ms);
    if (!leased.ok()) return leased.status();
    if (ctx_->workers) ctx_->workers->Seen(req->worker_id(), device_kind, leased->has_value(), now);
    if (!leased->has_value()) return Status::Ok();
    const JobRecord& j = **leased;
    if (ctx_->metrics && j.attempts == 1) ctx_->metrics->JobLeased(double(now - j.created_ms) / 1000.0);
    auto described = Describe(ctx_, j);
    if (!described.ok()) {
      JobOutcome o;
      o.state = JobState::kFailed;
      const bool corrupt = described.status().code() == Code::kDataLoss;
      o.error_code = corrupt ? "DATA_LOSS" : "FAILED_PRECONDITION";
      o.error_reason = corrupt ? "CORRUPT_JOB" : "INPUT_MISSING";
      o.error_message = described.status().message();
      auto failed = ctx_->store->CompleteJob(j.id, j.lease_id, o, ctx_->clock->NowMs());
      if (ctx_->workers) ctx_->workers->Touch(req->worker_id(), false, now);
      if (failed.ok())
        JobChanged(*ctx_, failed.value(), device_kind);
      else
        ctx_->events->Publish(j.id);
      return Status::Ok();
    }
    *resp->mutable_job() = described.value();
    spdlog::info(Kv({{"msg", "job leased"},
                     {"job", j.id},
                     {"worker", req->worker_id()},
                     {"device", req->capabilities().device_name()},
                     {"attempt", std::to_string(j.attempts)}}));
    ctx_->events->Publish(j.id);
    return Status::Ok();
  });
}

grpc::ServerUnaryReactor* WorkersService::Heartbeat(grpc::CallbackServerContext* call,
                                                    const v1::HeartbeatRequest* req,
                                                    v1::HeartbeatResponse* resp) {
  if (Status st = ctx_->auth->Worker(call); !st.ok()) return Refuse(call, st);
  return RunUnary(ctx_->executor, call, [this, req, resp]() -> Status {
    std::string progress;
    req->progress().SerializeToString(&progress);
    if (req->checkpoint_json().size() > kMaxCheckpointBytes)
      return InvalidArgument("checkpoint_json is larger than 1 MiB");
    auto j = ctx_->store->Heartbeat(req->job_id(), req->lease_id(), progress, ctx_->clock->NowMs(),
                                    ctx_->limits.lease_ttl_ms, req->checkpoint_json());
    if (!j.ok()) {
      if (j.status().code() == Code::kFailedPrecondition || j.status().code() == Code::kNotFound) {
        resp->set_lease_valid(false);
        return Status::Ok();
      }
      return j.status();
    }
    resp->set_lease_valid(true);
    resp->set_cancelled(j->cancel_requested);
    if (ctx_->workers) ctx_->workers->Touch(j->worker, true, ctx_->clock->NowMs());
    ctx_->events->Publish(j->id);
    return Status::Ok();
  });
}

grpc::ServerWriteReactor<v1::Chunk>* WorkersService::Fetch(grpc::CallbackServerContext* call,
                                                           const v1::FetchRequest* req) {
  if (Status st = ctx_->auth->Worker(call); !st.ok())
    return new ErrorWriteReactor<v1::Chunk>(ToGrpcStatus(st));
  auto resolve = [ctx = ctx_, job_id = req->job_id(), lease_id = req->lease_id(),
                  sha = req->sha256()]() -> Result<BlobRef> {
    PARE_ASSIGN_OR_RETURN(auto j, ctx->store->GetJob("", job_id));
    if (j.state != JobState::kRunning || j.lease_id != lease_id) {
      return FailedPrecondition("the lease on job '" + job_id + "' is not held by this worker");
    }
    PARE_ASSIGN_OR_RETURN(auto described, Describe(ctx, j));
    bool referenced = described.model_sha256() == sha;
    for (const auto& m : described.models()) referenced = referenced || m.sha256() == sha;
    for (const auto& d : described.datasets()) referenced = referenced || d.sha256() == sha;
    if (!referenced) return PermissionDenied("blob " + sha + " is not an input of job '" + job_id + "'");
    return StoredBlob(ctx->blobs, sha, "input blob " + sha);
  };
  Metrics* metrics = ctx_->metrics;
  return new BlobSendReactor(ctx_->executor, resolve, req->offset(), [metrics](uint64_t n) {
    if (metrics) metrics->Downloaded("input", n);
  });
}

grpc::ServerReadReactor<v1::CompleteRequest>* WorkersService::Complete(grpc::CallbackServerContext* call,
                                                                       v1::CompleteResponse*) {
  if (Status st = ctx_->auth->Worker(call); !st.ok())
    return new ErrorReadReactor<v1::CompleteRequest>(ToGrpcStatus(st));
  auto* r = new CompleteReactor(ctx_);
  r->Begin();
  return r;
}

}  // namespace pare::server
