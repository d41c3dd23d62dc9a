// The one place where pare::Status becomes grpc::Status and back.
#pragma once

#include <grpcpp/support/status.h>

#include "common/status.h"

namespace pare {

// Messages are capped so a huge error text never travels in trailers.
inline grpc::Status ToGrpcStatus(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  std::string msg = s.message();
  constexpr size_t kMax = 1024;
  if (msg.size() > kMax) msg = msg.substr(0, kMax) + "...";
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), msg);
}

inline Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return Status::Ok();
  return Status(static_cast<Code>(s.error_code()), s.error_message());
}

}  // namespace pare
