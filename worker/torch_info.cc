#include "worker/torch_info.h"

#include <torch/cuda.h>
#include <torch/version.h>

#include <filesystem>
#include <fstream>

namespace pare::worker {
namespace {

// The value after "key:" on the first line of `path` that starts with `key`.
std::string ReadField(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) != 0) continue;
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string v = line.substr(colon + 1);
    v.erase(0, v.find_first_not_of(" \t"));
    return v;
  }
  return "";
}

}  // namespace

bool CudaAvailable() { return torch::cuda::is_available(); }
std::string LibTorchVersion() { return TORCH_VERSION; }

std::string DeviceName(bool cuda) {
  std::error_code ec;
  if (cuda) {
    for (const auto& gpu : std::filesystem::directory_iterator("/proc/driver/nvidia/gpus", ec)) {
      std::string model = ReadField((gpu.path() / "information").string(), "Model");
      if (!model.empty()) return model;
    }
    return "cuda";
  }
  std::string cpu = ReadField("/proc/cpuinfo", "model name");
  return cpu.empty() ? "cpu" : cpu;
}

}  // namespace pare::worker
