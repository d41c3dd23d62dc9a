#include "server/compression_service.h"

#include <chrono>

#include <mutex>

#include "common/grpc_status.h"
#include "common/ids.h"
#include "common/logging.h"
#include "common/protocol.h"
#include "server/convert.h"
#include "server/job_end.h"
#include "server/reactors.h"
#include "worker/recipe_convert.h"

namespace pare::server {
namespace {

// The tenant's stored-bytes quota, before an upload of `size` bytes is accepted.
Status CheckStorageQuota(ServiceContext* ctx, const std::string& tenant, uint64_t size) {
  if (ctx->limits.tenant_max_bytes == 0) return Status::Ok();
  PARE_ASSIGN_OR_RETURN(auto usage, ctx->store->Usage(tenant));
  if (usage.stored_bytes + size > ctx->limits.tenant_max_bytes) {
    return ResourceExhausted("tenant '" + tenant + "' stored-bytes quota: it stores " +
                             std::to_string(usage.stored_bytes) + " of " +
                             std::to_string(ctx->limits.tenant_max_bytes) + " bytes and this upload is " +
                             std::to_string(size));
  }
  return Status::Ok();
}

// What every upload header must satisfy: a sane name, a size within the limit, a well-formed digest.
Status CheckUploadHeader(const v1::UploadHeader& h, const Limits& limits) {
  if (h.name().size() > kMaxNameLength) {
    return InvalidArgument("header.name is longer than " + std::to_string(kMaxNameLength) + " characters");
  }
  for (unsigned char c : h.name()) {
    if (c < 0x20) return InvalidArgument("header.name contains control characters");
  }
  if (h.size_bytes() == 0) return InvalidArgument("header.size_bytes must be the file's size (> 0)");
  if (h.size_bytes() > limits.max_upload_bytes) {
    return ResourceExhausted("header.size_bytes " + std::to_string(h.size_bytes()) +
                             " exceeds the upload limit of " + std::to_string(limits.max_upload_bytes) +
                             " bytes");
  }
  if (!h.sha256().empty() && !IsHexSha256(h.sha256())) {
    return InvalidArgument("header.sha256 must be 64 lower-case hex characters");
  }
  return Status::Ok();
}

// Forward's input shapes in an upload header: 2 to 6 dimensions each, batch first.
Status CheckShape(const google::protobuf::RepeatedField<int64_t>& dims, const std::string& field) {
  if (dims.size() < 2 || dims.size() > 6)
    return InvalidArgument(field + " needs 2 to 6 dimensions (batch first)");
  for (int64_t d : dims) {
    if (d <= 0 || d > 100000)
      return InvalidArgument(field + " has a dimension out of range: " + std::to_string(d));
  }
  return Status::Ok();
}

// What differs between a model upload and a dataset upload: the header's own fields, the check
// of the received file, the record and where it is stored.
struct ModelKind {
  using Record = ModelRecord;
  using Proto = v1::Model;
  static constexpr const char* kName = "model";
  static constexpr const char* kIdPrefix = "mdl";

  static Status CheckHeader(const v1::UploadHeader& h) {
    if (!h.format().empty()) return InvalidArgument("header.format is for datasets; a model has none");
    if (h.input_shape_size() > 0) PARE_RETURN_IF_ERROR(CheckShape(h.input_shape(), "header.input_shape"));
    if (h.more_input_shapes_size() > 0 && h.input_shape_size() == 0) {
      return InvalidArgument("header.more_input_shapes needs header.input_shape (the first input's)");
    }
    if (h.more_input_shapes_size() > 15)
      return InvalidArgument("header.more_input_shapes has more than 15 shapes");
    for (int i = 0; i < h.more_input_shapes_size(); ++i) {
      PARE_RETURN_IF_ERROR(
          CheckShape(h.more_input_shapes(i).dims(), "header.more_input_shapes[" + std::to_string(i) + "]"));
    }
    return Status::Ok();
  }
  static Status CheckFile(const std::string& path, const v1::UploadHeader&, const Limits& limits) {
    return CheckTorchScriptArchive(path, limits.archive);
  }
  static void Fill(const v1::UploadHeader& h, Record& m) {
    m.input_shape.assign(h.input_shape().begin(), h.input_shape().end());
    for (const auto& more : h.more_input_shapes())
      m.more_input_shapes.emplace_back(more.dims().begin(), more.dims().end());
  }
  static Status Put(Store* store, const Record& m, uint64_t quota) { return store->PutModel(m, quota); }
  static std::pair<const char*, std::string> LogField(const Record& m) { return {"sha256", m.sha256}; }
};

struct DatasetKind {
  using Record = DatasetRecord;
  using Proto = v1::Dataset;
  static constexpr const char* kName = "dataset";
  static constexpr const char* kIdPrefix = "ds";

  static Status CheckHeader(const v1::UploadHeader& h) {
    if (!IsKnownDatasetFormat(h.format())) {
      return InvalidArgument("header.format must be one of tensors, idx, image-folder; got '" + h.format() +
                             "'");
    }
    return Status::Ok();
  }
  static Status CheckFile(const std::string& path, const v1::UploadHeader& h, const Limits& limits) {
    return CheckDataset(path, h.format(), limits.archive);
  }
  static void Fill(const v1::UploadHeader& h, Record& d) { d.format = h.format(); }
  static Status Put(Store* store, const Record& d, uint64_t quota) { return store->PutDataset(d, quota); }
  static std::pair<const char*, std::string> LogField(const Record& d) { return {"format", d.format}; }
};

// An upload of a model or a dataset: the header checked (its own fields, the common limits, the
// tenant's quota), the file streamed into the blob store and checked there, then the record.
template <typename Kind>
class Upload final : public IngestReactor<v1::UploadRequest, v1::UploadHeader> {
 public:
  Upload(ServiceContext* ctx, std::string tenant, typename Kind::Proto* resp)
      : IngestReactor(ctx->executor, ctx->blobs),
        ctx_(ctx),
        tenant_(std::move(tenant)),
        resp_(resp),
        start_(std::chrono::steady_clock::now()) {}

 protected:
  Status OnHeader(const v1::UploadHeader& h, uint64_t* expected, uint64_t* limit) override {
    PARE_RETURN_IF_ERROR(Kind::CheckHeader(h));
    PARE_RETURN_IF_ERROR(CheckUploadHeader(h, ctx_->limits));
    PARE_RETURN_IF_ERROR(CheckStorageQuota(ctx_, tenant_, h.size_bytes()));
    *expected = *limit = h.size_bytes();
    return Status::Ok();
  }

  Status Finalize(const v1::UploadHeader& h, BlobWriter* writer) override {
    PARE_ASSIGN_OR_RETURN(auto sha, writer->Commit(h.size_bytes(), h.sha256(), [&](const std::string& path) {
      return Kind::CheckFile(path, h, ctx_->limits);
    }));
    typename Kind::Record r;
    r.id = NewId(Kind::kIdPrefix);
    r.tenant = tenant_;
    r.name = h.name();
    r.sha256 = sha;
    r.size_bytes = h.size_bytes();
    r.created_ms = ctx_->clock->NowMs();
    Kind::Fill(h, r);
    // The quota again, atomically with the insert: uploads that passed the header check together
    // (on this server or another) cannot exceed it together.
    PARE_RETURN_IF_ERROR(Kind::Put(ctx_->store, r, ctx_->limits.tenant_max_bytes));
    spdlog::info(Kv({{"msg", std::string(Kind::kName) + " uploaded"},
                     {Kind::kName, r.id},
                     Kind::LogField(r),
                     {"bytes", std::to_string(r.size_bytes)}}));
    if (ctx_->metrics) ctx_->metrics->Uploaded(Kind::kName, r.size_bytes, SecondsSince(start_));
    *resp_ = ToProto(r);
    return Status::Ok();
  }

 private:
  ServiceContext* ctx_;
  std::string tenant_;
  typename Kind::Proto* resp_;
  std::chrono::steady_clock::time_point start_;
};

// The checks of a SubmitJob request that need no state: required fields, the recipe (translated
// as the worker will), the device and the limits. Returns the steps.
Result<std::vector<engine::StepSpec>> ValidateSubmitJob(const v1::SubmitJobRequest& req,
                                                        const Limits& limits) {
  if (req.model_id().empty()) return InvalidArgument("model_id is required");
  PARE_ASSIGN_OR_RETURN(auto steps, ToEngineSteps(req.recipe()));
  const std::string& device = req.device();
  if (!(device.empty() || device == "auto" || device == "cpu" || device == "cuda")) {
    return InvalidArgument("device must be cpu, cuda or auto; got '" + device + "'");
  }
  if (req.request_id().size() > 128) return InvalidArgument("request_id is longer than 128 characters");
  if (int64_t(req.timeout_seconds()) > limits.max_job_seconds) {
    return InvalidArgument("timeout_seconds " + std::to_string(req.timeout_seconds()) +
                           " exceeds the server's maximum of " + std::to_string(limits.max_job_seconds));
  }
  return steps;
}

// A step that trains needs the train dataset; a search, the eval dataset.
Status CheckTrainData(const std::vector<engine::StepSpec>& steps, const v1::SubmitJobRequest& req) {
  for (size_t i = 0; i < steps.size(); ++i) {
    if (engine::NeedsTrainData(steps[i]) && req.train_dataset_id().empty()) {
      return InvalidArgument("train_dataset_id is required: steps[" + std::to_string(i) + "] (" +
                             engine::StepName(steps[i]) + ") trains the model");
    }
    if (engine::NeedsEvalData(steps[i]) && req.eval_dataset_id().empty()) {
      return InvalidArgument("eval_dataset_id is required: steps[" + std::to_string(i) + "] (" +
                             engine::StepName(steps[i]) + ") measures every candidate's accuracy on it");
    }
  }
  return Status::Ok();
}

// A lookup's status with the request field it came from: NOT_FOUND names the field; a store
// failure (UNAVAILABLE, INTERNAL) stays what it is.
Status Exists(const Status& looked_up, const std::string& field) {
  if (looked_up.code() != Code::kNotFound) return looked_up;
  return Status(looked_up.code(), field + ": " + looked_up.message());
}

// The models the recipe names exist for the tenant.
Status CheckRecipeModels(Store* store, const std::string& tenant, const v1::SubmitJobRequest& req) {
  for (const auto& [field, id] : ReferencedModels(req.recipe())) {
    PARE_RETURN_IF_ERROR(Exists(store->GetModel(tenant, id).status(), field));
  }
  return Status::Ok();
}

// The job's model and datasets exist for the tenant.
Status CheckInputs(Store* store, const std::string& tenant, const v1::SubmitJobRequest& req) {
  PARE_RETURN_IF_ERROR(Exists(store->GetModel(tenant, req.model_id()).status(), "model_id"));
  for (const auto& [field, id] :
       {std::pair<const char*, std::string>{"calibration_dataset_id", req.calibration_dataset_id()},
        {"train_dataset_id", req.train_dataset_id()},
        {"eval_dataset_id", req.eval_dataset_id()}}) {
    if (!id.empty()) PARE_RETURN_IF_ERROR(Exists(store->GetDataset(tenant, id).status(), field));
  }
  return Status::Ok();
}

JobRecord NewJob(const std::string& tenant, const v1::SubmitJobRequest& req, const Limits& limits,
                 int64_t now_ms) {
  JobRecord j;
  j.id = NewId("job");
  j.tenant = tenant;
  j.request_id = req.request_id();
  j.model_id = req.model_id();
  req.recipe().SerializeToString(&j.recipe_pb);
  j.calibration_dataset_id = req.calibration_dataset_id();
  j.train_dataset_id = req.train_dataset_id();
  j.eval_dataset_id = req.eval_dataset_id();
  j.device = req.device().empty() ? "auto" : req.device();
  j.timeout_seconds = req.timeout_seconds() ? int64_t(req.timeout_seconds()) : limits.max_job_seconds;
  j.max_attempts = limits.max_attempts;
  j.created_ms = now_ms;
  return j;
}

// Streams a job's state now and after every change, until it ends or the client leaves.
class WatchReactor final : public grpc::ServerWriteReactor<v1::Job> {
 public:
  WatchReactor(ServiceContext* ctx, std::string tenant, std::string job_id)
      : ctx_(ctx), tenant_(std::move(tenant)), job_id_(std::move(job_id)), alive_(std::make_shared<Alive>()) {
    alive_->self = this;
    token_ = ctx_->events->Subscribe(job_id_, [alive = alive_] {
      std::lock_guard<std::mutex> lock(alive->mu);
      if (alive->self) alive->self->Notify();
    });
    Notify();
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    busy_ = false;
    if (!ok) return FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    if (last_was_terminal_) return FinishLocked(grpc::Status::OK);
    if (cancelled_) return FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    if (dirty_) {
      dirty_ = false;
      busy_ = true;
      lock.unlock();
      Load();
    }
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    if (!busy_) FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(alive_->mu);
      alive_->self = nullptr;  // a publisher holding the callback now finds nobody
    }
    ctx_->events->Unsubscribe(token_);
    delete this;
  }

 private:
  // Outlives the reactor inside the event subscription.
  struct Alive {
    std::mutex mu;  // guards self
    WatchReactor* self = nullptr;
  };

  // Called by JobEvents (any thread) and at start.
  void Notify() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      if (busy_) {
        dirty_ = true;
        return;
      }
      busy_ = true;
    }
    Load();
  }

  // busy_ is set: no other Load or write is in flight, and the call is not finished.
  void Load() {
    bool posted = ctx_->executor->TryPost([this] {
      auto job = ctx_->store->GetJob(tenant_, job_id_);
      std::unique_lock<std::mutex> lock(mu_);
      if (!job.ok()) {
        busy_ = false;
        return FinishLocked(ToGrpcStatus(job.status()));
      }
      v1::Job next = ToProto(job.value());
      std::string bytes = next.SerializeAsString();
      if (bytes == last_sent_) {
        // A change announced twice (by this server and, through the database, by itself or
        // another): the client already has it.
        busy_ = false;
        if (cancelled_) return FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
        if (!dirty_ || finished_) return;
        dirty_ = false;
        busy_ = true;
        lock.unlock();
        return Load();
      }
      last_sent_ = std::move(bytes);
      msg_ = std::move(next);
      last_was_terminal_ = IsTerminal(job->state);
      StartWrite(&msg_);
    });
    if (!posted) {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ = false;
      FinishLocked(Overloaded());
    }
  }

  void FinishLocked(const grpc::Status& s) {
    if (finished_) return;
    finished_ = true;
    Finish(s);
  }

  ServiceContext* ctx_;
  const std::string tenant_;
  const std::string job_id_;
  std::shared_ptr<Alive> alive_;
  uint64_t token_ = 0;
  std::mutex mu_;       // guards the flags below and msg_
  bool busy_ = false;   // a load or a write is in flight
  bool dirty_ = false;  // a change arrived while busy
  bool cancelled_ = false;
  bool finished_ = false;
  bool last_was_terminal_ = false;
  std::string last_sent_;  // the last Job written, serialized
  v1::Job msg_;
};

}  // namespace

// The caller's tenant, for every handler; new work (an upload, a job) is refused while the server
// drains: it would outlive it.
Result<std::string> CompressionService::Admit(grpc::CallbackServerContext* call, bool new_work) {
  if (new_work && ctx_->draining) return Unavailable("the server is shutting down; retry on another replica");
  return ctx_->auth->Client(call);
}

template <typename F>
grpc::ServerUnaryReactor* CompressionService::ForTenant(grpc::CallbackServerContext* call, bool new_work,
                                                        F&& body) {
  auto tenant = Admit(call, new_work);
  if (!tenant.ok()) return Refuse(call, tenant.status());
  return RunUnary(ctx_->executor, call,
                  [tenant = tenant.value(), body = std::forward<F>(body)]() mutable { return body(tenant); });
}

namespace {

// An upload of `Kind` by the admitted tenant (or the refusal).
template <typename Kind, typename Proto>
grpc::ServerReadReactor<v1::UploadRequest>* StartUpload(ServiceContext* ctx,
                                                        const Result<std::string>& tenant, Proto* resp) {
  if (!tenant.ok()) return new ErrorReadReactor<v1::UploadRequest>(ToGrpcStatus(tenant.status()));
  auto* r = new Upload<Kind>(ctx, tenant.value(), resp);
  r->Begin();
  return r;
}

// A looked-up record as the call's response.
template <typename Record, typename Proto>
Status Fill(const Result<Record>& record, Proto* resp) {
  if (!record.ok()) return record.status();
  *resp = ToProto(record.value());
  return Status::Ok();
}

}  // namespace

grpc::ServerReadReactor<v1::UploadRequest>* CompressionService::UploadModel(grpc::CallbackServerContext* call,
                                                                            v1::Model* resp) {
  return StartUpload<ModelKind>(ctx_, Admit(call, /*new_work=*/true), resp);
}

grpc::ServerReadReactor<v1::UploadRequest>* CompressionService::UploadDataset(
    grpc::CallbackServerContext* call, v1::Dataset* resp) {
  return StartUpload<DatasetKind>(ctx_, Admit(call, /*new_work=*/true), resp);
}

grpc::ServerUnaryReactor* CompressionService::GetModel(grpc::CallbackServerContext* call,
                                                       const v1::GetModelRequest* req, v1::Model* resp) {
  return ForTenant(call, /*new_work=*/false, [this, req, resp](const std::string& tenant) -> Status {
    return Fill(ctx_->store->GetModel(tenant, req->id()), resp);
  });
}

grpc::ServerUnaryReactor* CompressionService::GetDataset(grpc::CallbackServerContext* call,
                                                         const v1::GetDatasetRequest* req,
                                                         v1::Dataset* resp) {
  return ForTenant(call, /*new_work=*/false, [this, req, resp](const std::string& tenant) -> Status {
    return Fill(ctx_->store->GetDataset(tenant, req->id()), resp);
  });
}

grpc::ServerUnaryReactor* CompressionService::SubmitJob(grpc::CallbackServerContext* call,
                                                        const v1::SubmitJobRequest* req, v1::Job* resp) {
  return ForTenant(call, /*new_work=*/true, [this, req, resp](const std::string& tenant) -> Status {
    PARE_ASSIGN_OR_RETURN(auto steps, ValidateSubmitJob(*req, ctx_->limits));
    PARE_RETURN_IF_ERROR(CheckRecipeModels(ctx_->store, tenant, *req));
    PARE_RETURN_IF_ERROR(CheckTrainData(steps, *req));
    PARE_RETURN_IF_ERROR(CheckInputs(ctx_->store, tenant, *req));
    PARE_ASSIGN_OR_RETURN(auto created,
                          ctx_->store->CreateJob(NewJob(tenant, *req, ctx_->limits, ctx_->clock->NowMs()),
                                                 Store::QueueLimits{ctx_->limits.tenant_max_active_jobs,
                                                                    ctx_->limits.max_queued_jobs}));
    const auto& [stored, fresh] = created;
    if (fresh) {
      if (ctx_->metrics) ctx_->metrics->JobSubmitted();
      spdlog::info(Kv({{"msg", "job submitted"},
                       {"job", stored.id},
                       {"model", stored.model_id},
                       {"first_step", FirstStepKind(req->recipe())}}));
    }
    *resp = ToProto(stored);
    return Status::Ok();
  });
}

grpc::ServerUnaryReactor* CompressionService::GetJob(grpc::CallbackServerContext* call,
                                                     const v1::GetJobRequest* req, v1::Job* resp) {
  return ForTenant(call, /*new_work=*/false, [this, req, resp](const std::string& tenant) -> Status {
    return Fill(ctx_->store->GetJob(tenant, req->id()), resp);
  });
}

grpc::ServerUnaryReactor* CompressionService::ListJobs(grpc::CallbackServerContext* call,
                                                       const v1::ListJobsRequest* req,
                                                       v1::ListJobsResponse* resp) {
  return ForTenant(call, /*new_work=*/false, [this, req, resp](const std::string& tenant) -> Status {
    int size = req->page_size() <= 0 ? 50 : std::min(req->page_size(), ctx_->limits.max_page_size);
    int64_t after = 0;
    if (!req->page_token().empty()) {
      try {
        size_t used = 0;
        after = std::stoll(req->page_token(), &used);
        if (used != req->page_token().size() || after < 0) throw std::invalid_argument("bad");
      } catch (const std::exception&) {
        return InvalidArgument("page_token is not one this server returned");
      }
    }
    PARE_ASSIGN_OR_RETURN(auto jobs, ctx_->store->ListJobs(tenant, after, size + 1));
    for (int i = 0; i < static_cast<int>(jobs.size()) && i < size; ++i)
      *resp->add_jobs() = ToProto((jobs)[i]);
    if (static_cast<int>(jobs.size()) > size) resp->set_next_page_token(std::to_string((jobs)[size - 1].seq));
    return Status::Ok();
  });
}

grpc::ServerUnaryReactor* CompressionService::CancelJob(grpc::CallbackServerContext* call,
                                                        const v1::CancelJobRequest* req, v1::Job* resp) {
  return ForTenant(call, /*new_work=*/false, [this, req, resp](const std::string& tenant) -> Status {
    const int64_t now = ctx_->clock->NowMs();
    PARE_ASSIGN_OR_RETURN(auto j, ctx_->store->CancelJob(tenant, req->id(), now));
    spdlog::info(Kv({{"msg", "job cancel requested"}, {"job", j.id}, {"state", JobStateName(j.state)}}));
    // A queued job ends here (a running one ends when its worker stops; one that had ended is
    // not counted again).
    if (j.state == JobState::kCancelled && j.finished_ms == now)
      JobChanged(*ctx_, j, "");
    else
      ctx_->events->Publish(j.id);
    *resp = ToProto(j);
    return Status::Ok();
  });
}

grpc::ServerWriteReactor<v1::Job>* CompressionService::WatchJob(grpc::CallbackServerContext* call,
                                                                const v1::WatchJobRequest* req) {
  auto tenant = Admit(call, /*new_work=*/false);
  if (!tenant.ok()) return new ErrorWriteReactor<v1::Job>(ToGrpcStatus(tenant.status()));
  if (req->id().empty())
    return new ErrorWriteReactor<v1::Job>(ToGrpcStatus(InvalidArgument("id is required")));
  return new WatchReactor(ctx_, tenant.value(), req->id());
}

grpc::ServerWriteReactor<v1::Chunk>* CompressionService::DownloadResult(grpc::CallbackServerContext* call,
                                                                        const v1::DownloadRequest* req) {
  auto authenticated = Admit(call, /*new_work=*/false);
  if (!authenticated.ok()) return new ErrorWriteReactor<v1::Chunk>(ToGrpcStatus(authenticated.status()));
  std::string tenant = authenticated.value();
  std::string job_id = req->job_id();
  v1::ResultKind kind = req->kind() == v1::REPORT ? v1::REPORT : v1::MODEL;
  auto resolve = [ctx = ctx_, tenant, job_id, kind]() -> Result<BlobRef> {
    PARE_ASSIGN_OR_RETURN(auto j, ctx->store->GetJob(tenant, job_id));
    const std::string& sha = kind == v1::REPORT ? j.report_sha256 : j.result_sha256;
    // A FAILED job may have kept its result (an auto search's closest model and its report).
    if (j.state != JobState::kSucceeded && !(j.state == JobState::kFailed && !sha.empty())) {
      return FailedPrecondition("job '" + job_id + "' is " + JobStateName(j.state) +
                                "; its result can be downloaded once it has SUCCEEDED");
    }
    return StoredBlob(ctx->blobs, sha, "the result of job '" + job_id + "'");
  };
  Metrics* metrics = ctx_->metrics;
  return new BlobSendReactor(ctx_->executor, resolve, req->offset(), [metrics, kind](uint64_t n) {
    if (metrics) metrics->Downloaded(kind == v1::REPORT ? "report" : "result", n);
  });
}

}  // namespace pare::server
