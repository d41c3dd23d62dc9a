// Content-addressed blob files: written to a temporary file while hashed, made visible
// (fsync + rename into blobs/ab/<sha256>) only once whole and verified.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/sha256.h"
#include "common/status.h"

namespace pare::server {

class BlobStore;

// One blob being written. Destroying an uncommitted writer removes its temporary file.
class BlobWriter {
 public:
  ~BlobWriter();
  BlobWriter(const BlobWriter&) = delete;
  BlobWriter& operator=(const BlobWriter&) = delete;

  // Appends bytes; RESOURCE_EXHAUSTED past the writer's limit, INTERNAL on a write error.
  Status Append(const void* data, size_t size);
  uint64_t size() const { return size_; }

  // Checks the size and (when given) the digest, runs `check` on the complete temporary
  // file, then fsyncs and renames into place. Returns the content's SHA-256. Identical
  // content already stored is kept once. On any error the temporary file is removed.
  Result<std::string> Commit(uint64_t expected_size, const std::string& expected_sha256,
                             const std::function<Status(const std::string& path)>& check = nullptr);

  const std::string& temp_path() const { return temp_path_; }

 private:
  friend class BlobStore;
  BlobWriter(BlobStore* store, std::string temp_path, int fd, uint64_t limit);
  void Abort();

  BlobStore* store_;
  std::string temp_path_;
  int fd_;
  uint64_t limit_;
  uint64_t size_ = 0;
  Sha256 hash_;
  bool done_ = false;
};

class BlobStore {
 public:
  // Creates `root`/blobs and `root`/tmp, and removes temporary files a crash left behind: all of
  // them, or with `shared` (several servers on one folder, whose uploads in progress keep
  // writing theirs) those untouched for an hour.
  static Result<std::unique_ptr<BlobStore>> Open(const std::string& root, bool shared = false);

  Result<std::unique_ptr<BlobWriter>> NewWriter(uint64_t limit_bytes);
  bool Exists(const std::string& sha256) const;
  // Path of a committed blob (which must exist).
  std::string PathOf(const std::string& sha256) const;
  Result<uint64_t> SizeOf(const std::string& sha256) const;
  // Stores a small in-memory blob (reports).
  Result<std::string> PutBytes(const std::string& bytes);

  // Committed blobs and their bytes (walks the folder: for periodic metrics, not hot paths).
  std::pair<uint64_t, uint64_t> CountAndBytes() const;

  const std::string& root() const { return root_; }
  std::string tmp_dir() const { return root_ + "/tmp"; }

 private:
  explicit BlobStore(std::string root) : root_(std::move(root)) {}
  std::string root_;
};

}  // namespace pare::server
