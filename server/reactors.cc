#include "server/reactors.h"

namespace pare::server {

BlobSendReactor::BlobSendReactor(Executor* executor, BlobStore* blobs,
                                 std::function<Result<BlobRef>()> resolve, uint64_t offset,
                                 std::function<void(uint64_t)> on_sent)
    : executor_(executor),
      blobs_(blobs),
      resolve_(std::move(resolve)),
      offset_(offset),
      on_sent_(std::move(on_sent)) {
  Post([this] { Resolve(); });
}

void BlobSendReactor::Post(std::function<void()> f) {
  if (!executor_->TryPost(std::move(f))) Finish(Overloaded());
}

void BlobSendReactor::Resolve() {
  auto blob = resolve_();
  if (!blob.ok()) return Finish(ToGrpcStatus(blob.status()));
  blob_ = blob.value();
  if (offset_ > blob_.size) {
    return Finish(ToGrpcStatus(Status(Code::kOutOfRange, "offset " + std::to_string(offset_) +
                                                             " is past the end of the file (" +
                                                             std::to_string(blob_.size) + " bytes)")));
  }
  auto reader = blobs_->NewReader(blob_.sha256);
  if (!reader.ok()) return Finish(ToGrpcStatus(reader.status()));
  reader_ = std::move(reader).value();
  SendNext();
}

void BlobSendReactor::SendNext() {
  if (offset_ >= blob_.size && sent_any_) return Finish(grpc::Status::OK);
  sent_any_ = true;  // even a resume at the very end gets one chunk carrying size and digest
  std::string* data = chunk_.mutable_data();
  const size_t want = static_cast<size_t>(std::min<uint64_t>(kChunkBytes, blob_.size - offset_));
  Status read = reader_->ReadAt(offset_, want, data);
  if (!read.ok()) return Finish(ToGrpcStatus(read));
  if (data->empty() && want > 0) return Finish(ToGrpcStatus(Internal("reading blob failed: it ended early")));
  offset_ += data->size();
  chunk_.set_total_size(blob_.size);
  chunk_.set_sha256(blob_.sha256);
  StartWrite(&chunk_);
}

void BlobSendReactor::OnWriteDone(bool ok) {
  if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
  if (on_sent_) on_sent_(chunk_.data().size());
  Post([this] { SendNext(); });
}

}  // namespace pare::server
