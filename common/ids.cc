#include "common/ids.h"

#include <openssl/rand.h>

#include <stdexcept>

namespace pare {

std::string NewId(const std::string& prefix) {
  unsigned char b[8];
  if (RAND_bytes(b, sizeof b) != 1) throw std::runtime_error("RAND_bytes failed");
  static const char* kHex = "0123456789abcdef";
  std::string out = prefix + "_";
  for (unsigned char c : b) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

}  // namespace pare
