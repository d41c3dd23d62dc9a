// The embedded database: one SQLite file in WAL mode with synchronous=FULL, so every
// acknowledged write survives kill -9 and power loss. One connection, one transaction at a time.
#pragma once

#include <memory>
#include <string>

#include "server/sql.h"

namespace pare::server {

Result<std::unique_ptr<SqlBackend>> OpenSqlite(const std::string& path);

}  // namespace pare::server
