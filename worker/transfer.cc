#include <grpcpp/grpcpp.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common/file_chunks.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/protocol.h"
#include "common/retry.h"
#include "common/sha256.h"
#include "worker/engine/error.h"
#include "worker/worker.h"
#include "worker/worker_internal.h"

namespace pare::worker {

namespace fs = std::filesystem;

std::chrono::milliseconds TransferBackoff(int retry) {
  return RetryDelay(retry, std::chrono::milliseconds(500), std::chrono::seconds(16));
}

[[noreturn]] void DiskError(const std::string& what, const std::string& path, int err) {
  throw engine::EngineError(Code::kInternal, kReasonWorkerDisk,
                            "the worker cannot write " + what + " to " + path + ": " + std::strerror(err));
}

void WriteFileChecked(const std::string& what, const std::string& path, const std::string& text) {
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (out) out.write(text.data(), static_cast<std::streamsize>(text.size()));
  if (out) out.close();
  if (!out) DiskError(what, path, errno ? errno : EIO);
}

Status Worker::Fetch(const v1::LeasedJob& job, const std::string& sha, const std::string& path) {
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
      if (!out.write(chunk.data().data(), static_cast<std::streamsize>(chunk.data().size())) ||
          !out.flush()) {
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
      if (got != sha) return DataLoss("input " + sha + " arrived with digest " + got);
      return Status::Ok();
    }
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE &&
        st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      return Status(FromGrpcStatus(st).code(), "fetching input " + sha + ": " + st.error_message());
    }
    spdlog::warn(Kv({{"msg", "fetching an input failed; retrying"},
                     {"job", job.job_id()},
                     {"sha256", sha},
                     {"attempt", std::to_string(attempt + 1)},
                     {"have", std::to_string(have)},
                     {"error", st.error_message()}}));
  }
  // The server is unreachable (restarting?): the job goes back to the queue, not to FAILED.
  throw engine::EngineError(Code::kUnavailable, kReasonServerUnreachable,
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
    if (writer->Write(req) && !result_path.empty()) {
      SendFileInChunks(result_path, [&](const char* data, size_t n) {
        v1::CompleteRequest c;
        c.set_chunk(data, n);
        return writer->Write(c);
      });
    }
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    if (st.ok()) return;
    spdlog::warn(
        Kv({{"msg", "reporting the result failed"}, {"job", job.job_id()}, {"error", st.error_message()}}));
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE &&
        st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED &&
        st.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) {
      return;  // e.g. the lease moved on: the result is not ours to give any more
    }
    std::this_thread::sleep_for(TransferBackoff(attempt + 1));
  }
}

}  // namespace pare::worker
