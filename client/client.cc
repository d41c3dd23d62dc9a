#include "client/client.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common/file_chunks.h"
#include "common/grpc_status.h"
#include "common/protocol.h"
#include "common/retry.h"
#include "common/sha256.h"

namespace pare::client {
namespace {

namespace fs = std::filesystem;

std::shared_ptr<grpc::Channel> ChannelFor(const ClientOptions& o) {
  auto channel = MakeChannel(o.server, o.tls);
  // Bad TLS files are found by the CLI before it gets here (CheckTls); a channel to nowhere
  // then answers every call with UNAVAILABLE rather than crashing.
  return channel.ok() ? channel.value()
                      : grpc::CreateChannel("unix:/nonexistent", grpc::InsecureChannelCredentials());
}

bool Retryable(const Status& s) { return s.code() == Code::kUnavailable; }

}  // namespace

Client::Client(ClientOptions options) : Client(ChannelFor(options), options) {}

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : options_(std::move(options)), stub_(v1::Compression::NewStub(std::move(channel))) {}

void Client::Authorize(grpc::ClientContext* ctx) const {
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
}

std::unique_ptr<grpc::ClientContext> Client::Ctx(double seconds) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  Authorize(ctx.get());
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  return ctx;
}

template <typename Resp>
Result<Resp> Client::Upload(const std::string& path, v1::UploadHeader header, const ByteProgress& progress) {
  // The server's limit, checked before any byte is read or sent.
  if (header.name().size() > kMaxNameLength) {
    return InvalidArgument("the name '" + header.name().substr(0, 40) + "...' is longer than " +
                           std::to_string(kMaxNameLength) + " characters");
  }
  std::error_code ec;
  uint64_t size = fs::file_size(path, ec);
  if (ec) return InvalidArgument("cannot read " + path + ": " + ec.message());
  std::string sha = Sha256OfFile(path);
  if (sha.empty()) return InvalidArgument("cannot read " + path);
  header.set_size_bytes(size);
  header.set_sha256(sha);
  auto ctx = Ctx(options_.transfer_deadline_seconds);
  Resp resp;
  std::unique_ptr<grpc::ClientWriter<v1::UploadRequest>> writer;
  if constexpr (std::is_same_v<Resp, v1::Model>)
    writer = stub_->UploadModel(ctx.get(), &resp);
  else
    writer = stub_->UploadDataset(ctx.get(), &resp);
  v1::UploadRequest req;
  *req.mutable_header() = header;
  if (writer->Write(req)) {
    SendFileInChunks(
        path,
        [&](const char* data, size_t n) {
          v1::UploadRequest c;
          c.set_chunk(data, n);
          return writer->Write(c);
        },
        [&](uint64_t sent) {
          if (progress) progress(sent, size);
        });
  }
  writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) return FromGrpcStatus(st);
  return resp;
}

Result<v1::Model> Client::UploadModel(const std::string& path, const std::string& name,
                                      const std::vector<int64_t>& input_shape, const ByteProgress& progress,
                                      const std::vector<std::vector<int64_t>>& more_input_shapes) {
  v1::UploadHeader h;
  h.set_name(name.empty() ? fs::path(path).filename().string() : name);
  for (int64_t d : input_shape) h.add_input_shape(d);
  for (const auto& more : more_input_shapes) {
    auto* shape = h.add_more_input_shapes();
    for (int64_t d : more) shape->add_dims(d);
  }
  return Upload<v1::Model>(path, h, progress);
}

Result<v1::Dataset> Client::UploadDataset(const std::string& path, const std::string& format,
                                          const std::string& name, const ByteProgress& progress) {
  v1::UploadHeader h;
  h.set_name(name.empty() ? fs::path(path).filename().string() : name);
  h.set_format(format);
  return Upload<v1::Dataset>(path, h, progress);
}

template <typename Req, typename Resp>
Result<Resp> Client::Unary(grpc::Status (v1::Compression::Stub::*method)(grpc::ClientContext*, const Req&,
                                                                         Resp*),
                           const Req& req) {
  Resp resp;
  auto ctx = Ctx(options_.deadline_seconds);
  grpc::Status st = (stub_.get()->*method)(ctx.get(), req, &resp);
  if (!st.ok()) return FromGrpcStatus(st);
  return resp;
}

Result<v1::Model> Client::GetModel(const std::string& id) {
  v1::GetModelRequest req;
  req.set_id(id);
  return Unary(&v1::Compression::Stub::GetModel, req);
}

Result<v1::Dataset> Client::GetDataset(const std::string& id) {
  v1::GetDatasetRequest req;
  req.set_id(id);
  return Unary(&v1::Compression::Stub::GetDataset, req);
}

Result<v1::Job> Client::Submit(const v1::SubmitJobRequest& req) {
  return Unary(&v1::Compression::Stub::SubmitJob, req);
}

Result<v1::Job> Client::GetJob(const std::string& id) {
  v1::GetJobRequest req;
  req.set_id(id);
  return Unary(&v1::Compression::Stub::GetJob, req);
}

Result<v1::ListJobsResponse> Client::ListJobs(int page_size, const std::string& page_token) {
  v1::ListJobsRequest req;
  req.set_page_size(page_size);
  req.set_page_token(page_token);
  return Unary(&v1::Compression::Stub::ListJobs, req);
}

Result<v1::Job> Client::Cancel(const std::string& id) {
  v1::CancelJobRequest req;
  req.set_id(id);
  return Unary(&v1::Compression::Stub::CancelJob, req);
}

Result<v1::Job> Client::Watch(const std::string& id, const std::function<void(const v1::Job&)>& on_update) {
  int broken = 0;
  while (true) {
    v1::WatchJobRequest req;
    req.set_id(id);
    grpc::ClientContext ctx;  // a job may run for hours: no deadline on the stream itself
    Authorize(&ctx);
    auto reader = stub_->WatchJob(&ctx, req);
    v1::Job job;
    std::optional<v1::Job> last;
    while (reader->Read(&job)) {
      last = job;
      if (on_update) on_update(job);
    }
    Status st = FromGrpcStatus(reader->Finish());
    if (last && last->state() >= v1::SUCCEEDED) return *last;
    if (!st.ok() && !Retryable(st)) return st;
    if (++broken > 30) return st.ok() ? Unavailable("the watch stream kept ending before the job did") : st;
    std::this_thread::sleep_for(RetryDelay(broken, std::chrono::milliseconds(200), std::chrono::seconds(5)));
  }
}

Status Client::Download(const std::string& job_id, v1::ResultKind kind, const std::string& out_path,
                        const ByteProgress& progress) {
  const std::string part = out_path + ".part";
  std::error_code ec;
  uint64_t have = fs::exists(part, ec) ? fs::file_size(part, ec) : 0;
  for (int attempt = 0; attempt < 10; ++attempt) {
    v1::DownloadRequest req;
    req.set_job_id(job_id);
    req.set_kind(kind);
    req.set_offset(have);
    auto ctx = Ctx(options_.transfer_deadline_seconds);
    auto reader = stub_->DownloadResult(ctx.get(), req);
    std::ofstream out(part, std::ios::binary | std::ios::app);
    if (!out) return InvalidArgument("cannot write " + part);
    v1::Chunk chunk;
    std::string sha;
    uint64_t total = 0;
    while (reader->Read(&chunk)) {
      out.write(chunk.data().data(), static_cast<std::streamsize>(chunk.data().size()));
      have += chunk.data().size();
      sha = chunk.sha256();
      total = chunk.total_size();
      if (progress) progress(have, total);
    }
    out.close();
    Status st = FromGrpcStatus(reader->Finish());
    if (st.ok()) {
      // A resumed download whose part was already whole gets no chunk: check the file itself.
      std::string got = Sha256OfFile(part);
      if (!sha.empty() && got != sha) {
        fs::remove(part, ec);
        return DataLoss("the downloaded file's SHA-256 " + got + " differs from the server's " + sha +
                        "; the partial file was removed, run the command again");
      }
      fs::rename(part, out_path, ec);
      if (ec) return InvalidArgument("cannot write " + out_path + ": " + ec.message());
      return Status::Ok();
    }
    if (st.code() == Code::kDataLoss) {
      fs::remove(part, ec);  // what arrived may hold the bad bytes: nothing of it is kept to resume
      return Status(Code::kDataLoss, st.message() + " (the partial file was removed)");
    }
    if (st.code() == Code::kOutOfRange) {
      fs::remove(part, ec);  // a stale part longer than the result: start again
      have = 0;
      continue;
    }
    if (!Retryable(st)) return st;
    std::this_thread::sleep_for(
        RetryDelay(attempt + 1, std::chrono::milliseconds(500), std::chrono::seconds(5)));
  }
  return Unavailable("the download kept breaking off; run the command again to resume");
}

}  // namespace pare::client
