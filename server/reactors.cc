#include "server/reactors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace pare::server {

BlobSendReactor::BlobSendReactor(Executor* executor, std::function<Result<BlobRef>()> resolve,
                                 uint64_t offset, std::function<void(uint64_t)> on_sent)
    : executor_(executor), resolve_(std::move(resolve)), offset_(offset), on_sent_(std::move(on_sent)) {
  Post([this] { Resolve(); });
}

BlobSendReactor::~BlobSendReactor() {
  if (fd_ >= 0) ::close(fd_);
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
  fd_ = ::open(blob_.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0)
    return Finish(ToGrpcStatus(Internal("cannot open blob: " + std::string(std::strerror(errno)))));
  SendNext();
}

void BlobSendReactor::SendNext() {
  if (offset_ >= blob_.size && sent_any_) return Finish(grpc::Status::OK);
  sent_any_ = true;  // even a resume at the very end gets one chunk carrying size and digest
  std::string* data = chunk_.mutable_data();
  data->resize(std::min<uint64_t>(kChunkBytes, blob_.size - offset_));
  ssize_t n = data->empty() ? 0 : ::pread(fd_, data->data(), data->size(), static_cast<off_t>(offset_));
  if (n < 0 || (n == 0 && !data->empty())) return Finish(ToGrpcStatus(Internal("reading blob failed")));
  data->resize(static_cast<size_t>(n));
  offset_ += static_cast<uint64_t>(n);
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
