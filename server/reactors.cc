#include "server/reactors.h"

namespace pare::server {

BlobSendReactor::BlobSendReactor(Executor* executor, std::function<Result<BlobRef>()> resolve,
                                 uint64_t offset, std::function<void(uint64_t)> on_sent)
    : executor_(executor), resolve_(std::move(resolve)), offset_(offset), on_sent_(std::move(on_sent)) {
  Post([this] { Resolve(); });
}

void BlobSendReactor::Post(std::function<void()> f) {
  if (!executor_->TryPost(std::move(f))) Finish(Overloaded());
}

void BlobSendReactor::Resolve() {
  auto blob = resolve_();
  if (!blob.ok()) return Finish(ToGrpcStatus(blob.status()));
  blob_ = std::move(blob).value();
  size_ = blob_.reader->size();
  if (offset_ > size_) {
    return Finish(ToGrpcStatus(Status(Code::kOutOfRange, "offset " + std::to_string(offset_) +
                                                             " is past the end of the file (" +
                                                             std::to_string(size_) + " bytes)")));
  }
  SendNext();
}

void BlobSendReactor::SendNext() {
  if (offset_ >= size_ && sent_any_) return Finish(grpc::Status::OK);
  sent_any_ = true;  // even a resume at the very end gets one chunk carrying size and digest
  std::string* data = chunk_.mutable_data();
  const size_t want = static_cast<size_t>(std::min<uint64_t>(kChunkBytes, size_ - offset_));
  Status read = blob_.reader->ReadAt(offset_, want, data);
  if (!read.ok()) return Finish(ToGrpcStatus(read));
  if (data->empty() && want > 0) return Finish(ToGrpcStatus(Internal("reading blob failed: it ended early")));
  offset_ += data->size();
  chunk_.set_total_size(size_);
  chunk_.set_sha256(blob_.sha256);
  StartWrite(&chunk_);
}

void BlobSendReactor::OnWriteDone(bool ok) {
  if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
  if (on_sent_) on_sent_(chunk_.data().size());
  Post([this] { SendNext(); });
}

}  // namespace pare::server
