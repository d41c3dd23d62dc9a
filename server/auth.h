// Bearer-token authentication: client tokens map to tenants, one worker token is accepted
// by the Workers service only. Tokens are kept as SHA-256 digests, so a lookup's timing
// tells nothing about a token's prefix.
#pragma once

#include <grpcpp/grpcpp.h>

#include <map>
#include <string>

#include "common/status.h"

namespace pare::server {

class Authenticator {
 public:
  // No tokens: every client is tenant "default" and workers need no token (loopback only).
  Authenticator() = default;

  // `tokens_file`: one "TENANT TOKEN" per line, '#' starts a comment; tokens of at least 16
  // characters. `worker_token` is the Workers service's token.
  static Result<Authenticator> FromFile(const std::string& tokens_file, const std::string& worker_token);

  bool enabled() const { return enabled_; }
  // The caller's tenant, or UNAUTHENTICATED.
  Result<std::string> Client(const grpc::CallbackServerContext* call) const;
  // OK for the worker token, else UNAUTHENTICATED.
  Status Worker(const grpc::CallbackServerContext* call) const;

 private:
  bool enabled_ = false;
  std::map<std::string, std::string> tenants_by_digest_;  // sha256(token) -> tenant
  std::string worker_digest_;
};

// The bearer token of a call ("" when absent).
std::string BearerToken(const grpc::CallbackServerContext* call);

}  // namespace pare::server
