// The one place where pare::Status becomes grpc::Status and back.
#pragma once

#include <grpcpp/support/status.h>

#include "common/status.h"

namespace pare {

// pare::Code takes gRPC's numbering, so the two convert by value; checked here, code by code.
#define PARE_SAME_CODE(ours, theirs) \
  static_assert(static_cast<int>(Code::ours) == static_cast<int>(grpc::StatusCode::theirs), #ours)
PARE_SAME_CODE(kOk, OK);
PARE_SAME_CODE(kCancelled, CANCELLED);
PARE_SAME_CODE(kUnknown, UNKNOWN);
PARE_SAME_CODE(kInvalidArgument, INVALID_ARGUMENT);
PARE_SAME_CODE(kDeadlineExceeded, DEADLINE_EXCEEDED);
PARE_SAME_CODE(kNotFound, NOT_FOUND);
PARE_SAME_CODE(kAlreadyExists, ALREADY_EXISTS);
PARE_SAME_CODE(kPermissionDenied, PERMISSION_DENIED);
PARE_SAME_CODE(kResourceExhausted, RESOURCE_EXHAUSTED);
PARE_SAME_CODE(kFailedPrecondition, FAILED_PRECONDITION);
PARE_SAME_CODE(kAborted, ABORTED);
PARE_SAME_CODE(kOutOfRange, OUT_OF_RANGE);
PARE_SAME_CODE(kUnimplemented, UNIMPLEMENTED);
PARE_SAME_CODE(kInternal, INTERNAL);
PARE_SAME_CODE(kUnavailable, UNAVAILABLE);
PARE_SAME_CODE(kDataLoss, DATA_LOSS);
PARE_SAME_CODE(kUnauthenticated, UNAUTHENTICATED);
#undef PARE_SAME_CODE

// A gRPC code as ours; one outside gRPC's 17 is UNKNOWN.
inline Code FromGrpcCode(grpc::StatusCode c) {
  const int i = static_cast<int>(c);
  return i >= 0 && i <= static_cast<int>(Code::kUnauthenticated) ? static_cast<Code>(i) : Code::kUnknown;
}

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
  return Status(FromGrpcCode(s.error_code()), s.error_message());
}

}  // namespace pare
