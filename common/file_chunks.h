// A file sent as a stream's chunks (uploads, a worker's result): the one loop both the client
// and the worker use.
#pragma once

#include <cstdint>
#include <fstream>
#include <functional>
#include <string>

#include "common/protocol.h"

namespace pare {

// Reads `path` in pieces of at most kChunkBytes and hands each to `write(data, size)`, which
// returns false once the stream has broken; `sent(bytes so far)` after each piece. Returns
// whether every piece was written.
template <typename Write>
bool SendFileInChunks(const std::string& path, Write&& write,
                      const std::function<void(uint64_t)>& sent = nullptr) {
  std::ifstream in(path, std::ios::binary);
  std::string buf(kChunkBytes, '\0');
  uint64_t total = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = in.gcount();
    if (n <= 0) break;
    if (!write(buf.data(), static_cast<size_t>(n))) return false;
    total += static_cast<uint64_t>(n);
    if (sent) sent(total);
  }
  return true;
}

}  // namespace pare
