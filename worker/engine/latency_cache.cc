#include "worker/engine/latency_cache.h"

#include <unistd.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include <nlohmann/json.hpp>

namespace pare::engine {
namespace fs = std::filesystem;

// Raised whenever the way latency is timed changes, so that older figures are not reused.
constexpr int kTimingVersion = 3;  // 2: batch 1 timed on the agreement samples; 3: warm-up in the budget

LatencyCache::LatencyCache(const std::string& dir, const std::string& model_digest, const HostInfo& host,
                           const std::string& device, const std::vector<std::vector<int64_t>>& shapes,
                           const std::vector<int>& batches, double budget_seconds) {
  if (dir.empty() || model_digest.empty()) return;
  nlohmann::json key = {{"timing", kTimingVersion}, {"model", model_digest},
                        {"cpu", host.cpu},          {"extensions", host.extensions},
                        {"threads", host.threads},  {"blas", host.blas},
                        {"device", device},         {"shapes", shapes},
                        {"batches", batches},       {"budget_seconds", budget_seconds}};
  key_ = key.dump();
  std::ostringstream name;
  name << std::hex << std::hash<std::string>{}(key_) << ".json";
  path_ = (fs::path(dir) / name.str()).string();
}

std::optional<LatencyCache::Entry> LatencyCache::Find() const {
  if (!enabled()) return std::nullopt;
  std::ifstream in(path_);
  if (!in) return std::nullopt;
  try {
    nlohmann::json j = nlohmann::json::parse(in);
    if (j.at("key").get<std::string>() != key_) return std::nullopt;  // another key, same hash
    Entry e;
    e.measured_at = j.at("measured_at").get<std::string>();
    for (const auto& l : j.at("latency")) {
      Latency x;
      x.batch = l.at("batch").get<int>();
      x.p50_ms = l.at("p50_ms").get<double>();
      x.p95_ms = l.at("p95_ms").get<double>();
      x.iterations = l.at("iterations").get<int>();
      if (x.batch < 1 || !(x.p50_ms > 0) || x.p95_ms < x.p50_ms || x.iterations < 1) return std::nullopt;
      e.latency.push_back(x);
    }
    if (e.latency.empty()) return std::nullopt;
    return e;
  } catch (const std::exception&) {
    return std::nullopt;  // truncated or foreign: measure again, and the store replaces it
  }
}

void LatencyCache::Store(const std::vector<Latency>& latency) const {
  if (!enabled() || latency.empty()) return;
  nlohmann::json lat = nlohmann::json::array();
  for (const auto& l : latency) {
    lat.push_back(
        {{"batch", l.batch}, {"p50_ms", l.p50_ms}, {"p95_ms", l.p95_ms}, {"iterations", l.iterations}});
  }
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};
  gmtime_r(&now, &utc);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &utc);
  std::error_code ec;
  fs::create_directories(fs::path(path_).parent_path(), ec);
  const std::string tmp = path_ + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << nlohmann::json{{"key", key_}, {"measured_at", when}, {"latency", lat}}.dump() << "\n";
    out.flush();
    if (!out) {
      fs::remove(tmp, ec);
      return;
    }
  }
  fs::rename(tmp, path_, ec);
  if (ec) fs::remove(tmp, ec);
}

}  // namespace pare::engine
