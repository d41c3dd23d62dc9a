#include "common/tls.h"

#include <fstream>
#include <sstream>

#include "common/protocol.h"

namespace pare {
namespace {

Result<std::string> ReadPem(const std::string& path, const std::string& flag) {
  std::ifstream in(path);
  if (!in) return InvalidArgument(flag + ": cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  if (text.find("-----BEGIN ") == std::string::npos)
    return InvalidArgument(flag + ": " + path + " is not a PEM file");
  return text;
}

}  // namespace

Result<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address, const TlsClientFiles& tls) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  if (!tls.enabled()) {
    if (!tls.cert.empty() || !tls.key.empty())
      return InvalidArgument("--tls-cert and --tls-key need --tls-ca");
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions o;
  PARE_ASSIGN_OR_RETURN(auto ca, ReadPem(tls.ca, "--tls-ca"));
  o.pem_root_certs = ca;
  if (tls.cert.empty() != tls.key.empty()) return InvalidArgument("--tls-cert and --tls-key go together");
  if (!tls.cert.empty()) {
    PARE_ASSIGN_OR_RETURN(auto cert, ReadPem(tls.cert, "--tls-cert"));
    PARE_ASSIGN_OR_RETURN(auto key, ReadPem(tls.key, "--tls-key"));
    o.pem_cert_chain = cert;
    o.pem_private_key = key;
  }
  if (!tls.server_name.empty()) args.SetSslTargetNameOverride(tls.server_name);
  return grpc::CreateCustomChannel(address, grpc::SslCredentials(o), args);
}

Result<std::shared_ptr<grpc::ServerCredentials>> TlsServerCredentials(const std::string& cert,
                                                                      const std::string& key,
                                                                      const std::string& client_ca) {
  PARE_ASSIGN_OR_RETURN(auto c, ReadPem(cert, "--tls-cert"));
  PARE_ASSIGN_OR_RETURN(auto k, ReadPem(key, "--tls-key"));
  grpc::SslServerCredentialsOptions o(client_ca.empty()
                                          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_key_cert_pairs.push_back({k, c});
  if (!client_ca.empty()) {
    PARE_ASSIGN_OR_RETURN(auto ca, ReadPem(client_ca, "--tls-client-ca"));
    o.pem_root_certs = ca;
  }
  return grpc::SslServerCredentials(o);
}

}  // namespace pare
