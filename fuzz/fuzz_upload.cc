// libFuzzer: the server's upload validator on arbitrary bytes, as a model and as each
// dataset format. It must answer (OK or INVALID_ARGUMENT), never crash, hang or leak.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "server/archive_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/pare-fuzz-upload-" + std::to_string(::getpid());
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  pare::server::ArchiveLimits limits;
  limits.max_entries = 1000;
  limits.max_uncompressed_bytes = 64 << 20;
  (void)pare::server::CheckTorchScriptArchive(path, limits);
  for (const char* format : {"tensors", "idx", "image-folder"})
    (void)pare::server::CheckDataset(path, format, limits);
  return 0;
}
