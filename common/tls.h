// TLS for the gRPC port: server credentials (optionally requiring client certificates,
// i.e. mutual TLS) and the client side used by the CLI, the client library and workers.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "common/status.h"

namespace pare {

struct TlsClientFiles {
  std::string ca;           // PEM: the CA that signed the server's certificate (required for TLS)
  std::string cert, key;    // PEM: this client's certificate and key, for mutual TLS
  std::string server_name;  // expected name in the server's certificate, if not the address's host
  bool enabled() const { return !ca.empty(); }
};

// A channel to `address`: plaintext when `tls` is not enabled. INVALID_ARGUMENT names the
// file that cannot be read.
Result<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address, const TlsClientFiles& tls);

// Server credentials from PEM files; with `client_ca`, clients must present a certificate
// signed by it.
Result<std::shared_ptr<grpc::ServerCredentials>> TlsServerCredentials(const std::string& cert,
                                                                      const std::string& key,
                                                                      const std::string& client_ca);

}  // namespace pare
