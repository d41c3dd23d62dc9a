// PostgreSQL under the store (libpq): several pare-server replicas on one database. A small pool
// of connections; a connection that broke (the database restarted, the network failed) is
// replaced on the next call, and calls while the database is down fail UNAVAILABLE.
#pragma once

#include <memory>
#include <string>

#include "server/sql.h"

namespace pare::server {

// `url`: "postgresql://user@host:5432/db?sslmode=require" (any libpq connection string; sslmode
// and the other libpq parameters are honoured). `password`, when not empty, is passed beside the
// URL (so it never needs to be in one); otherwise libpq reads PGPASSWORD or ~/.pgpass.
// Connects once to check the database can be reached.
Result<std::unique_ptr<SqlBackend>> OpenPostgres(const std::string& url, const std::string& password,
                                                 int pool_size = 8);

// The URL with any password in it replaced by "***" (for logs).
std::string RedactUrl(const std::string& url);

}  // namespace pare::server
