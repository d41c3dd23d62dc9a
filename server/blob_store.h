// Content-addressed blobs (models, datasets, results, reports). An upload is written to a local
// temporary file while hashed, checked whole (size, digest, the caller's check of the file),
// and only then installed where every reader finds it: a folder (FileBlobStore: fsync + rename
// into <dir>/ab/<sha256>) or the job database (DatabaseBlobStore, `--blob-store postgresql`:
// chunks, each addressed by its own SHA-256, in the transaction that records the blob), so
// replicas need nothing but the database. Reads are checked too: a chunk whose bytes no longer match its
// digest fails.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "common/sha256.h"
#include "common/status.h"

namespace pare::server {

class BlobStore;
class SqlBackend;

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
  // file, then installs it in the store. Returns the content's SHA-256. Identical content
  // already stored is kept once. On any error the temporary file is removed.
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

// Reads one stored blob from any offset.
class BlobReader {
 public:
  virtual ~BlobReader() = default;
  // Up to `max` bytes from `offset` into `out` (fewer at the end, or at a chunk's end); none at
  // or past the end. DATA_LOSS when stored bytes no longer match their digest.
  virtual Status ReadAt(uint64_t offset, size_t max, std::string* out) = 0;
  // The blob's size in bytes.
  virtual uint64_t size() const = 0;
};

class BlobStore {
 public:
  virtual ~BlobStore() = default;

  Result<std::unique_ptr<BlobWriter>> NewWriter(uint64_t limit_bytes);
  // Stores a small in-memory blob (reports).
  Result<std::string> PutBytes(const std::string& bytes);

  // Whether a blob is stored (an error when the store cannot tell).
  virtual Result<bool> Has(const std::string& sha256) = 0;
  // NOT_FOUND when it is not stored.
  virtual Result<uint64_t> SizeOf(const std::string& sha256) = 0;
  // NOT_FOUND when it is not stored.
  virtual Result<std::unique_ptr<BlobReader>> NewReader(const std::string& sha256) = 0;
  // Stored blobs and their bytes (for periodic metrics, not hot paths: a folder is walked).
  virtual Result<std::pair<uint64_t, uint64_t>> CountAndBytes() = 0;
  // "files" or "postgresql" (for logs).
  virtual std::string kind() const = 0;

  const std::string& tmp_dir() const { return tmp_dir_; }

 protected:
  // Creates `tmp_dir` and removes the temporary files a crash left there: all of them, or with
  // `shared` (several servers on one folder, whose uploads in progress keep writing theirs)
  // those untouched for an hour.
  Status PrepareTmp(bool shared);
  explicit BlobStore(std::string tmp_dir) : tmp_dir_(std::move(tmp_dir)) {}
  // Makes the complete, verified temporary file (open as `fd`, `size` bytes) the blob `sha256`,
  // kept once where it is already stored. The writer removes the temporary file afterwards
  // when it is still there.
  virtual Status Install(const std::string& temp_path, int fd, const std::string& sha256, uint64_t size) = 0;

 private:
  friend class BlobWriter;
  std::string tmp_dir_;
};

// Blobs as files under `dir` (`dir`/ab/<sha256>), temporary files in `tmp_dir` (on the same
// file system: installing is a rename). Several servers may share the folder (a ReadWriteMany
// volume): `shared`.
class FileBlobStore final : public BlobStore {
 public:
  static Result<std::unique_ptr<FileBlobStore>> Open(const std::string& dir, const std::string& tmp_dir,
                                                     bool shared = false);

  Result<bool> Has(const std::string& sha256) override;
  Result<uint64_t> SizeOf(const std::string& sha256) override;
  Result<std::unique_ptr<BlobReader>> NewReader(const std::string& sha256) override;
  Result<std::pair<uint64_t, uint64_t>> CountAndBytes() override;
  std::string kind() const override { return "files"; }

  // Path of a stored blob's file.
  std::string PathOf(const std::string& sha256) const;
  const std::string& dir() const { return dir_; }

 protected:
  Status Install(const std::string& temp_path, int fd, const std::string& sha256, uint64_t size) override;

 private:
  FileBlobStore(std::string dir, std::string tmp_dir) : BlobStore(std::move(tmp_dir)), dir_(std::move(dir)) {}
  std::string dir_;
};

// Blobs in the job database (schema version 4: blobs, blob_parts, blob_chunks; the server uses it
// on PostgreSQL, and the same SQL runs on SQLite for the tests): each blob is a row
// (size, chunk size) and an ordered list of chunks of `chunk_bytes`, each chunk stored once by
// its own SHA-256. Writes insert the chunks and the blob in one transaction (readers never see
// part of a blob; two servers storing the same content keep it once); reads fetch one chunk per
// call and check it against its digest, and a read from the start to the end checks the whole
// blob's digest before its last bytes go out. `tmp_dir` is local to this server.
class DatabaseBlobStore final : public BlobStore {
 public:
  static Result<std::unique_ptr<DatabaseBlobStore>> Open(std::unique_ptr<SqlBackend> db,
                                                         const std::string& tmp_dir, bool shared,
                                                         uint64_t chunk_bytes);
  ~DatabaseBlobStore() override;

  Result<bool> Has(const std::string& sha256) override;
  Result<uint64_t> SizeOf(const std::string& sha256) override;
  Result<std::unique_ptr<BlobReader>> NewReader(const std::string& sha256) override;
  Result<std::pair<uint64_t, uint64_t>> CountAndBytes() override;
  std::string kind() const override;

 protected:
  Status Install(const std::string& temp_path, int fd, const std::string& sha256, uint64_t size) override;

 private:
  DatabaseBlobStore(std::unique_ptr<SqlBackend> db, std::string tmp_dir, uint64_t chunk_bytes);
  std::unique_ptr<SqlBackend> db_;
  uint64_t chunk_bytes_;
};

}  // namespace pare::server
