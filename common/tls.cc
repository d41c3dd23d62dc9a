#include "common/tls.h"

#include <fstream>
#include <sstream>

namespace pare {
namespace {

Result<std::string> ReadPem(const std::string& path, const std::string& flag) {
  std::ifstream in(path);
  if (!in) return InvalidArgument(flag + ": cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  if (text.find("-----BEGIN ") == std::string::npos) return InvalidArgument(flag + ": " + path + " is not a PEM file");
  return text;
}

}  // namespace

Result<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address, const TlsClientFiles& tls) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(4 << 20);
  if (!tls.enabled()) {
    if (!tls.cert.empty() || !tls.key.empty()) return InvalidArgument("--tls-cert and --tls-key need --tls-ca");
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions o;
  auto ca = ReadPem(tls.ca, "--tls-ca");
  if (!ca.ok()) return ca.status();
  o.pem_root_certs = ca.value();
  if (tls.cert.empty() != tls.key.empty()) return InvalidArgument("--tls-cert and --tls-key go together");
  if (!tls.cert.empty()) {
    auto cert = ReadPem(tls.cert, "--tls-cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadPem(tls.key, "--tls-key");
    if (!key.ok()) return key.status();
    o.pem_cert_chain = cert.value();
    o.pem_private_key = key.value();
  }
  if (!tls.server_name.empty()) args.SetSslTargetNameOverride(tls.server_name);
  return grpc::CreateCustomChannel(address, grpc::SslCredentials(o), args);
}

Result<std::shared_ptr<grpc::ServerCredentials>> TlsServerCredentials(const std::string& cert, const std::string& key,
                                                                      const std::string& client_ca) {
  auto c = ReadPem(cert, "--tls-cert");
  if (!c.ok()) return c.status();
  auto k = ReadPem(key, "--tls-key");
  if (!k.ok()) return k.status();
  grpc::SslServerCredentialsOptions o(client_ca.empty()
                                          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_key_cert_pairs.push_back({k.value(), c.value()});
  if (!client_ca.empty()) {
    auto ca = ReadPem(client_ca, "--tls-client-ca");
    if (!ca.ok()) return ca.status();
    o.pem_root_certs = ca.value();
  }
  return grpc::SslServerCredentials(o);
}

}  // namespace pare
