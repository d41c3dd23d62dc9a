// libFuzzer: the worker-side dataset parsers on arbitrary bytes: an IDX file (gzip or not), a
// PNG/JPEG image, and a tar unpacked as an image folder. Each gets a tensor or an
// EngineError / Status naming the problem; nothing may be written outside the job folder.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "worker/dataset_files.h"
#include "worker/engine/dataset.h"
#include "worker/engine/error.h"
#include "worker/engine/image_folder.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = "/tmp/pare-fuzz-dataset-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/input";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    pare::engine::LoadDataset("idx", path);
  } catch (const pare::engine::EngineError&) {
  }
  try {
    pare::engine::DecodeImage("input", std::vector<uint8_t>(data, data + size), 3);
  } catch (const pare::engine::EngineError&) {
  }
  std::error_code ec;
  std::filesystem::remove_all(dir + "/unpacked", ec);
  (void)pare::worker::PrepareDataset(path, "image-folder", dir + "/unpacked");
  return 0;
}
