// Incremental SHA-256 (OpenSSL) with lower-case hex output.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace pare {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  // Returns the hex digest; the object is spent afterwards.
  std::string HexDigest();

  static std::string Of(const std::string& data);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// SHA-256 of a whole file, or "" when it cannot be read.
std::string Sha256OfFile(const std::string& path);

bool IsHexSha256(const std::string& s);

}  // namespace pare
