#include "server/auth.h"

#include <fstream>
#include <sstream>

#include "common/sha256.h"

namespace pare::server {

std::string BearerToken(const grpc::CallbackServerContext* call) {
  const auto& md = call->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return "";
  std::string value(it->second.data(), it->second.size());
  const std::string prefix = "Bearer ";
  return value.rfind(prefix, 0) == 0 ? value.substr(prefix.size()) : "";
}

Result<Authenticator> Authenticator::FromFile(const std::string& tokens_file,
                                              const std::string& worker_token) {
  std::ifstream in(tokens_file);
  if (!in) return InvalidArgument("--auth-tokens: cannot read " + tokens_file);
  if (worker_token.size() < 16) return InvalidArgument("the worker token must have at least 16 characters");
  Authenticator a;
  a.enabled_ = true;
  a.worker_digest_ = Sha256::Of(worker_token);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    std::istringstream fields(line);
    std::string tenant, token, extra;
    if (!(fields >> tenant)) continue;
    const std::string where = tokens_file + ":" + std::to_string(number);
    if (!(fields >> token) || (fields >> extra)) return InvalidArgument(where + ": expected 'TENANT TOKEN'");
    if (token.size() < 16) return InvalidArgument(where + ": tokens need at least 16 characters");
    std::string digest = Sha256::Of(token);
    if (digest == a.worker_digest_)
      return InvalidArgument(where + ": a client token may not be the worker token");
    if (!a.tenants_by_digest_.emplace(digest, tenant).second)
      return InvalidArgument(where + ": duplicate token");
  }
  if (a.tenants_by_digest_.empty())
    return InvalidArgument("--auth-tokens: " + tokens_file + " holds no token");
  return a;
}

Result<std::string> Authenticator::Client(const grpc::CallbackServerContext* call) const {
  if (!enabled_) return std::string("default");
  std::string token = BearerToken(call);
  if (token.empty()) return Status(Code::kUnauthenticated, "this call needs 'authorization: Bearer <token>'");
  auto it = tenants_by_digest_.find(Sha256::Of(token));
  if (it == tenants_by_digest_.end()) return Status(Code::kUnauthenticated, "the bearer token is not valid");
  return it->second;
}

Status Authenticator::Worker(const grpc::CallbackServerContext* call) const {
  if (!enabled_) return Status::Ok();
  std::string token = BearerToken(call);
  if (token.empty() || Sha256::Of(token) != worker_digest_) {
    return Status(Code::kUnauthenticated, "the Workers service needs the worker token");
  }
  return Status::Ok();
}

}  // namespace pare::server
