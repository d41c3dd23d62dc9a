// Reusable callback-API reactors: streaming a blob out from an offset, taking a
// header-then-chunks upload into a BlobWriter, and finishing at once with an error.
// Disk and database work runs on the Executor; every reactor Finishes exactly once and
// deletes itself in OnDone.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "common/grpc_status.h"
#include "common/protocol.h"
#include "pare/v1/compression.pb.h"
#include "server/blob_store.h"
#include "server/executor.h"

namespace pare::server {

inline grpc::Status Overloaded() {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "the server is overloaded; retry later");
}

// Finishes a unary call at once with `s` (e.g. UNAUTHENTICATED).
inline grpc::ServerUnaryReactor* Refuse(grpc::CallbackServerContext* call, const Status& s) {
  auto* reactor = call->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

// Runs `f` (returning Status) on the executor and finishes the unary call with it; the
// response object stays valid until Finish.
template <typename F>
grpc::ServerUnaryReactor* RunUnary(Executor* executor, grpc::CallbackServerContext* call, F&& f) {
  auto* reactor = call->DefaultReactor();
  if (!executor->TryPost(
          [reactor, f = std::forward<F>(f)]() mutable { reactor->Finish(ToGrpcStatus(f())); })) {
    reactor->Finish(Overloaded());
  }
  return reactor;
}

template <typename Resp>
class ErrorWriteReactor final : public grpc::ServerWriteReactor<Resp> {
 public:
  explicit ErrorWriteReactor(const grpc::Status& s) { this->Finish(s); }
  void OnDone() override { delete this; }
};

template <typename Req>
class ErrorReadReactor final : public grpc::ServerReadReactor<Req> {
 public:
  explicit ErrorReadReactor(const grpc::Status& s) { this->Finish(s); }
  void OnDone() override { delete this; }
};

// A blob to stream: its digest and a reader opened on it.
struct BlobRef {
  std::string sha256;
  std::unique_ptr<BlobReader> reader;
};

// The stored blob `sha256` of `blobs`, opened; `what` names it for the DATA_LOSS error when the
// blob store lacks it though a record refers to it ("the result of job 'j'").
inline Result<BlobRef> StoredBlob(BlobStore* blobs, const std::string& sha256, const std::string& what) {
  auto reader = blobs->NewReader(sha256);
  if (reader.status().code() == Code::kNotFound) return DataLoss(what + " is missing from the blob store");
  if (!reader.ok()) return reader.status();
  return BlobRef{sha256, std::move(reader).value()};
}

// Streams a blob as Chunks from `offset`. `resolve` (run on the executor) finds and opens the
// blob and checks the caller may read it.
class BlobSendReactor final : public grpc::ServerWriteReactor<v1::Chunk> {
 public:
  // `on_sent` (optional) learns the bytes of every chunk written.
  BlobSendReactor(Executor* executor, std::function<Result<BlobRef>()> resolve, uint64_t offset,
                  std::function<void(uint64_t)> on_sent = nullptr);
  void OnWriteDone(bool ok) override;
  void OnDone() override { delete this; }

 private:
  ~BlobSendReactor() override = default;
  void Resolve();
  void SendNext();
  void Post(std::function<void()> f);

  Executor* executor_;
  std::function<Result<BlobRef>()> resolve_;
  uint64_t offset_;
  std::function<void(uint64_t)> on_sent_;
  BlobRef blob_;
  uint64_t size_ = 0;
  bool sent_any_ = false;
  v1::Chunk chunk_;
};

// Takes a client stream of messages with a `header` and then `chunk`s into a BlobWriter.
// Subclasses say how big the content may be and what to do once it is whole.
template <typename Req, typename Header>
class IngestReactor : public grpc::ServerReadReactor<Req> {
 public:
  IngestReactor(Executor* executor, BlobStore* blobs) : executor_(executor), blobs_(blobs) {}

  // Call once from the handler after construction.
  void Begin() { this->StartRead(&req_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (cancelled_) return FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return Post([this] { FinishOnce(ToGrpcStatus(Complete())); });
    }
    if (!have_header_) {
      if (!req_.has_header()) {
        return FinishOnce(
            ToGrpcStatus(InvalidArgument("the first message of the stream must be the header")));
      }
      have_header_ = true;
      header_ = req_.header();
      uint64_t limit = 0;
      Status st = OnHeader(header_, &expected_size_, &limit);
      if (!st.ok()) return FinishOnce(ToGrpcStatus(st));
      return Post([this, limit] {
        auto w = blobs_->NewWriter(limit);
        if (!w.ok()) return FinishOnce(ToGrpcStatus(w.status()));
        writer_ = std::move(w).value();
        this->StartRead(&req_);
      });
    }
    if (!req_.has_chunk())
      return FinishOnce(ToGrpcStatus(InvalidArgument("after the header only chunks may follow")));
    if (req_.chunk().size() > kChunkBytes) {
      return FinishOnce(ToGrpcStatus(InvalidArgument("a chunk holds " + std::to_string(req_.chunk().size()) +
                                                     " bytes; the most is " + std::to_string(kChunkBytes))));
    }
    if (writer_->size() + req_.chunk().size() > expected_size_) {
      return FinishOnce(ToGrpcStatus(InvalidArgument("more bytes arrived than the header's size_bytes (" +
                                                     std::to_string(expected_size_) + ")")));
    }
    Post([this] {
      Status st = writer_->Append(req_.chunk().data(), req_.chunk().size());
      if (!st.ok()) return FinishOnce(ToGrpcStatus(st));
      this->StartRead(&req_);
    });
  }

  void OnCancel() override { cancelled_ = true; }
  void OnDone() override { delete this; }

 protected:
  ~IngestReactor() override = default;
  // Validates the header; sets the exact size expected and the writer's byte limit.
  virtual Status OnHeader(const Header& header, uint64_t* expected_size, uint64_t* limit) = 0;
  // Runs on the executor once the client closed its stream.
  virtual Status Finalize(const Header& header, BlobWriter* writer) = 0;

  Executor* executor_;
  BlobStore* blobs_;

 private:
  Status Complete() {
    if (!have_header_) return InvalidArgument("the stream ended before its header");
    return Finalize(header_, writer_.get());
  }
  void FinishOnce(const grpc::Status& s) {
    if (finished_.exchange(true)) return;
    writer_.reset();  // an unfinished upload leaves no temporary file behind
    this->Finish(s);
  }
  void Post(std::function<void()> f) {
    if (!executor_->TryPost(std::move(f))) FinishOnce(Overloaded());
  }

  Req req_;
  Header header_;
  bool have_header_ = false;
  uint64_t expected_size_ = 0;
  std::unique_ptr<BlobWriter> writer_;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> finished_{false};
};

}  // namespace pare::server
