#include "common/logging.h"

#include <spdlog/sinks/stdout_sinks.h>

#include <cstdlib>

namespace pare {

std::shared_ptr<spdlog::logger> InitLogging(const std::string& role) {
  auto logger = std::make_shared<spdlog::logger>(role, std::make_shared<spdlog::sinks::stderr_sink_mt>());
  // Messages are written as `"key":value` fragments by the caller; the pattern wraps them.
  logger->set_pattern(R"({"ts":"%Y-%m-%dT%H:%M:%S.%eZ","level":"%l","role":")" + role + R"(","pid":%P,%v})",
                      spdlog::pattern_time_type::utc);
  const char* level = std::getenv("PARE_LOG_LEVEL");
  logger->set_level(level ? spdlog::level::from_str(level) : spdlog::level::info);
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
  return logger;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  out.reserve(s.size() + 2);
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  return out;
}

}  // namespace pare

namespace pare {

std::string Kv(std::initializer_list<std::pair<const char*, std::string>> fields) {
  std::string out;
  for (const auto& [k, v] : fields) {
    if (!out.empty()) out += ',';
    out += '"';
    out += k;
    out += "\":\"";
    out += JsonEscape(v);
    out += '"';
  }
  return out;
}

}  // namespace pare
