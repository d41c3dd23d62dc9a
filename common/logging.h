// One spdlog logger per process role, writing JSON lines to stderr; the level comes from
// PARE_LOG_LEVEL (trace, debug, info, warn, error; default info).
#pragma once

#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace pare {

// Creates the process's logger named `role` ("server", "worker", "cli") and makes it the default.
std::shared_ptr<spdlog::logger> InitLogging(const std::string& role);

// Escapes a value for a JSON string.
std::string JsonEscape(const std::string& s);

}  // namespace pare

namespace pare {

// Builds the body of a JSON log line from key/value pairs: "k1":"v1","k2":"v2".
std::string Kv(std::initializer_list<std::pair<const char*, std::string>> fields);

}  // namespace pare
