#include "server/blob_store.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "common/ids.h"
#include "common/logging.h"
#include "server/sql.h"

namespace pare::server {
namespace {

namespace fs = std::filesystem;

Status FsyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return Internal("cannot open " + dir + ": " + std::strerror(errno));
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return Internal("fsync " + dir + ": " + std::strerror(errno));
  return Status::Ok();
}

// Reads exactly `size` bytes at `offset` of `fd` into `out`.
Status ReadFully(int fd, uint64_t offset, size_t size, std::string* out) {
  out->resize(size);
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, out->data() + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Internal("reading blob: " + std::string(std::strerror(errno)));
    if (n == 0) return DataLoss("the blob file ended early");
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

class FileBlobReader final : public BlobReader {
 public:
  FileBlobReader(int fd, uint64_t size) : fd_(fd), size_(size) {}
  ~FileBlobReader() override { ::close(fd_); }
  uint64_t size() const override { return size_; }
  Status ReadAt(uint64_t offset, size_t max, std::string* out) override {
    out->resize(max);
    ssize_t n;
    do {
      n = ::pread(fd_, out->data(), max, static_cast<off_t>(offset));
    } while (n < 0 && errno == EINTR);
    if (n < 0) return Internal("reading blob: " + std::string(std::strerror(errno)));
    out->resize(static_cast<size_t>(n));
    return Status::Ok();
  }

 private:
  int fd_;
  uint64_t size_;
};

// A blob's chunks fetched one at a time (the last one kept for reads inside it), each checked
// against its digest; read in order from the start, the whole blob's digest is checked before
// its last bytes are handed out.
class DatabaseBlobReader final : public BlobReader {
 public:
  DatabaseBlobReader(SqlBackend* db, std::string sha256, uint64_t size, uint64_t chunk_bytes)
      : db_(db), sha256_(std::move(sha256)), size_(size), chunk_bytes_(chunk_bytes) {}
  uint64_t size() const override { return size_; }

  Status ReadAt(uint64_t offset, size_t max, std::string* out) override {
    out->clear();
    if (offset >= size_ || max == 0) return Status::Ok();
    const int64_t idx = static_cast<int64_t>(offset / chunk_bytes_);
    if (idx != cached_idx_) PARE_RETURN_IF_ERROR(Fetch(idx));
    const uint64_t within = offset - static_cast<uint64_t>(idx) * chunk_bytes_;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(max, cached_.size() - within));
    if (offset == hashed_) {
      whole_.Update(cached_.data() + within, n);
      hashed_ += n;
      if (hashed_ == size_ && whole_.HexDigest() != sha256_) {
        return Corrupt("its chunks no longer add up to its digest");
      }
    }
    out->assign(cached_, within, n);
    return Status::Ok();
  }

 private:
  Status Fetch(int64_t idx) {
    PARE_ASSIGN_OR_RETURN(
        auto rows,
        InTransaction<SqlRows>(
            *db_,
            [&](SqlTx& tx) {
              return tx.QueryBytes(
                  "SELECT c.sha256, c.data FROM blob_parts p JOIN blob_chunks c ON c.sha256 = p.chunk "
                  "WHERE p.blob = ? AND p.idx = ?",
                  {sha256_, idx});
            },
            Access::kRead));
    if (rows.empty()) return Corrupt("chunk " + std::to_string(idx) + " is missing");
    const uint64_t start = static_cast<uint64_t>(idx) * chunk_bytes_;
    const uint64_t expected = std::min<uint64_t>(chunk_bytes_, size_ - start);
    std::string data = rows[0].Text(1);
    if (data.size() != expected || Sha256::Of(data) != rows[0].Text(0)) {
      return Corrupt("chunk " + std::to_string(idx) + "'s bytes no longer match its digest");
    }
    cached_ = std::move(data);
    cached_idx_ = idx;
    return Status::Ok();
  }

  Status Corrupt(const std::string& what) {
    spdlog::error(
        Kv({{"msg", "blob store: a stored blob is corrupt"}, {"sha256", sha256_}, {"cause", what}}));
    return DataLoss("blob " + sha256_ + " is corrupt in the database: " + what);
  }

  SqlBackend* db_;
  std::string sha256_;
  uint64_t size_;
  uint64_t chunk_bytes_;
  int64_t cached_idx_ = -1;
  std::string cached_;
  Sha256 whole_;
  uint64_t hashed_ = 0;  // bytes hashed in order from the start
};

}  // namespace

BlobWriter::BlobWriter(BlobStore* store, std::string temp_path, int fd, uint64_t limit)
    : store_(store), temp_path_(std::move(temp_path)), fd_(fd), limit_(limit) {}

BlobWriter::~BlobWriter() {
  if (!done_) Abort();
}

void BlobWriter::Abort() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(temp_path_.c_str());
  done_ = true;
}

Status BlobWriter::Append(const void* data, size_t size) {
  if (done_) return Internal("blob writer already finished");
  if (size_ + size > limit_) {
    return ResourceExhausted("upload exceeds the limit of " + std::to_string(limit_) + " bytes");
  }
  const char* p = static_cast<const char*>(data);
  size_t left = size;
  while (left > 0) {
    ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string err = std::strerror(errno);
      if (errno == ENOSPC || errno == EDQUOT) return ResourceExhausted("the server's disk is full: " + err);
      return Internal("writing blob: " + err);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  hash_.Update(data, size);
  size_ += size;
  return Status::Ok();
}

Result<std::string> BlobWriter::Commit(uint64_t expected_size, const std::string& expected_sha256,
                                       const std::function<Status(const std::string& path)>& check) {
  if (done_) return Internal("blob writer already finished");
  if (size_ != expected_size) {
    Abort();
    return InvalidArgument("received " + std::to_string(size_) + " bytes but the header declared " +
                           std::to_string(expected_size));
  }
  std::string digest = hash_.HexDigest();
  if (!expected_sha256.empty() && expected_sha256 != digest) {
    Abort();
    return InvalidArgument("content SHA-256 is " + digest + " but the header declared " + expected_sha256);
  }
  if (check) {
    Status st = check(temp_path_);
    if (!st.ok()) {
      Abort();
      return st;
    }
  }
  Status installed = store_->Install(temp_path_, fd_, digest, size_);
  Abort();  // closes the file and removes it where it is still there
  if (!installed.ok()) return installed;
  return digest;
}

Result<std::unique_ptr<BlobWriter>> BlobStore::NewWriter(uint64_t limit_bytes) {
  std::string path = tmp_dir_ + "/" + NewId("upload");
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Internal("cannot create temporary file: " + std::string(std::strerror(errno)));
  return std::unique_ptr<BlobWriter>(new BlobWriter(this, path, fd, limit_bytes));
}

Result<std::string> BlobStore::PutBytes(const std::string& bytes) {
  PARE_ASSIGN_OR_RETURN(auto w, NewWriter(bytes.size()));
  PARE_RETURN_IF_ERROR(w->Append(bytes.data(), bytes.size()));
  return w->Commit(bytes.size(), "");
}

Status BlobStore::PrepareTmp(bool shared) {
  std::error_code ec;
  fs::create_directories(tmp_dir_, ec);
  if (ec) return Internal("cannot create " + tmp_dir_ + ": " + ec.message());
  // Anything in tmp/ was never acknowledged: a crash interrupted its upload. Where several servers
  // share the folder (a ReadWriteMany volume), another's upload in progress keeps writing its
  // file: then only files left untouched for an hour are a crash's.
  const auto stale = fs::file_time_type::clock::now() - std::chrono::hours(1);
  for (const auto& e : fs::directory_iterator(tmp_dir_, ec)) {
    std::error_code age_ec;
    const auto written = fs::last_write_time(e.path(), age_ec);
    if (!shared || age_ec || written < stale) fs::remove_all(e.path(), ec);
  }
  return Status::Ok();
}

// ---- files ----

Result<std::unique_ptr<FileBlobStore>> FileBlobStore::Open(const std::string& dir, const std::string& tmp_dir,
                                                           bool shared) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Internal("cannot create " + dir + ": " + ec.message());
  std::unique_ptr<FileBlobStore> store(new FileBlobStore(dir, tmp_dir));
  PARE_RETURN_IF_ERROR(store->PrepareTmp(shared));
  return store;
}

Status FileBlobStore::Install(const std::string& temp_path, int fd, const std::string& sha256, uint64_t) {
  if (::fsync(fd) != 0) return Internal("fsync blob: " + std::string(std::strerror(errno)));
  const std::string final_path = PathOf(sha256);
  const std::string dir = fs::path(final_path).parent_path().string();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Internal("cannot create " + dir + ": " + ec.message());
  struct stat st;
  if (::stat(final_path.c_str(), &st) == 0) return Status::Ok();  // stored once
  if (::rename(temp_path.c_str(), final_path.c_str()) != 0) {
    return Internal("rename blob: " + std::string(std::strerror(errno)));
  }
  return FsyncDir(dir);
}

Result<bool> FileBlobStore::Has(const std::string& sha256) {
  struct stat st;
  return IsHexSha256(sha256) && ::stat(PathOf(sha256).c_str(), &st) == 0;
}

std::string FileBlobStore::PathOf(const std::string& sha256) const {
  return dir_ + "/" + sha256.substr(0, 2) + "/" + sha256;
}

Result<uint64_t> FileBlobStore::SizeOf(const std::string& sha256) {
  struct stat st;
  if (!IsHexSha256(sha256) || ::stat(PathOf(sha256).c_str(), &st) != 0) {
    return NotFound("blob " + sha256 + " is missing from the blob store");
  }
  return static_cast<uint64_t>(st.st_size);
}

Result<std::unique_ptr<BlobReader>> FileBlobStore::NewReader(const std::string& sha256) {
  if (!IsHexSha256(sha256)) return NotFound("blob " + sha256 + " is missing from the blob store");
  int fd = ::open(PathOf(sha256).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) return NotFound("blob " + sha256 + " is missing from the blob store");
  if (fd < 0) return Internal("cannot open blob: " + std::string(std::strerror(errno)));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    return Internal("cannot read blob: " + err);
  }
  return std::unique_ptr<BlobReader>(new FileBlobReader(fd, static_cast<uint64_t>(st.st_size)));
}

Result<std::pair<uint64_t, uint64_t>> FileBlobStore::CountAndBytes() {
  uint64_t count = 0, bytes = 0;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir_, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (!it->is_regular_file(ec) || !IsHexSha256(it->path().filename().string())) continue;
    ++count;
    bytes += it->file_size(ec);
  }
  return std::make_pair(count, bytes);
}

// ---- the database ----

DatabaseBlobStore::DatabaseBlobStore(std::unique_ptr<SqlBackend> db, std::string tmp_dir,
                                     uint64_t chunk_bytes)
    : BlobStore(std::move(tmp_dir)), db_(std::move(db)), chunk_bytes_(chunk_bytes) {}

DatabaseBlobStore::~DatabaseBlobStore() = default;

std::string DatabaseBlobStore::kind() const { return db_->dialect().name; }

Result<std::unique_ptr<DatabaseBlobStore>> DatabaseBlobStore::Open(std::unique_ptr<SqlBackend> db,
                                                                   const std::string& tmp_dir, bool shared,
                                                                   uint64_t chunk_bytes) {
  if (chunk_bytes == 0) return InvalidArgument("the blob chunk size must be positive");
  // The tables come with the store's schema (version 4), migrated before this opens.
  Status tables = db->Transact([](SqlTx& tx) { return tx.Query("SELECT COUNT(*) FROM blob_parts").status(); },
                               Access::kRead);
  if (!tables.ok()) {
    return Status(tables.code(), "the database has no blob tables (schema version 4): " + tables.message());
  }
  std::unique_ptr<DatabaseBlobStore> store(new DatabaseBlobStore(std::move(db), tmp_dir, chunk_bytes));
  PARE_RETURN_IF_ERROR(store->PrepareTmp(shared));
  return store;
}

Status DatabaseBlobStore::Install(const std::string&, int fd, const std::string& sha256, uint64_t size) {
  return db_->Transact([&](SqlTx& tx) -> Status {
    // Another server storing the same content at once waits here for it, then finds it stored.
    // Content already stored is written through again all the same: a chunk whose bytes changed
    // in the database (DATA_LOSS on reads) is repaired by uploading the file again.
    PARE_RETURN_IF_ERROR(
        tx.Exec("INSERT INTO blobs (sha256, size_bytes, chunk_bytes, created_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO NOTHING",
                {sha256, static_cast<int64_t>(size), static_cast<int64_t>(chunk_bytes_),
                 static_cast<int64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                          std::chrono::system_clock::now().time_since_epoch())
                                          .count())})
            .status());
    Sha256 whole;
    std::string chunk;
    int64_t idx = 0;
    for (uint64_t offset = 0; offset < size; offset += chunk.size(), ++idx) {
      PARE_RETURN_IF_ERROR(ReadFully(fd, offset, std::min<uint64_t>(chunk_bytes_, size - offset), &chunk));
      whole.Update(chunk.data(), chunk.size());
      const std::string chunk_sha = Sha256::Of(chunk);
      PARE_RETURN_IF_ERROR(tx.Exec("INSERT INTO blob_chunks (sha256, size_bytes, data) VALUES (?, ?, ?) "
                                   "ON CONFLICT (sha256) DO UPDATE SET data = excluded.data "
                                   "WHERE blob_chunks.data <> excluded.data",
                                   {chunk_sha, static_cast<int64_t>(chunk.size()), SqlParam::Blob(chunk)})
                               .status());
      PARE_RETURN_IF_ERROR(tx.Exec("INSERT INTO blob_parts (blob, idx, chunk) VALUES (?, ?, ?) "
                                   "ON CONFLICT (blob, idx) DO UPDATE SET chunk = excluded.chunk "
                                   "WHERE blob_parts.chunk <> excluded.chunk",
                                   {sha256, idx, chunk_sha})
                               .status());
    }
    // What went into the database is what was received and checked.
    if (whole.HexDigest() != sha256) return DataLoss("the temporary file of blob " + sha256 + " changed");
    return Status::Ok();
  });
}

Result<bool> DatabaseBlobStore::Has(const std::string& sha256) {
  auto size = SizeOf(sha256);
  if (size.ok()) return true;
  if (size.status().code() == Code::kNotFound) return false;
  return size.status();
}

Result<uint64_t> DatabaseBlobStore::SizeOf(const std::string& sha256) {
  PARE_ASSIGN_OR_RETURN(
      auto rows,
      InTransaction<SqlRows>(
          *db_,
          [&](SqlTx& tx) { return tx.Query("SELECT size_bytes FROM blobs WHERE sha256 = ?", {sha256}); },
          Access::kRead));
  if (rows.empty()) return NotFound("blob " + sha256 + " is missing from the blob store");
  return static_cast<uint64_t>(rows[0].Int(0));
}

Result<std::unique_ptr<BlobReader>> DatabaseBlobStore::NewReader(const std::string& sha256) {
  PARE_ASSIGN_OR_RETURN(auto rows, InTransaction<SqlRows>(
                                       *db_,
                                       [&](SqlTx& tx) {
                                         return tx.Query(
                                             "SELECT size_bytes, chunk_bytes FROM blobs WHERE sha256 = ?",
                                             {sha256});
                                       },
                                       Access::kRead));
  if (rows.empty()) return NotFound("blob " + sha256 + " is missing from the blob store");
  const int64_t size = rows[0].Int(0), chunk = rows[0].Int(1);
  if (size < 0 || chunk <= 0) return DataLoss("blob " + sha256 + " has a corrupt record in the database");
  return std::unique_ptr<BlobReader>(
      new DatabaseBlobReader(db_.get(), sha256, static_cast<uint64_t>(size), static_cast<uint64_t>(chunk)));
}

Result<std::pair<uint64_t, uint64_t>> DatabaseBlobStore::CountAndBytes() {
  PARE_ASSIGN_OR_RETURN(
      auto rows,
      InTransaction<SqlRows>(
          *db_,
          [](SqlTx& tx) { return tx.Query("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM blobs"); },
          Access::kRead));
  return std::make_pair(static_cast<uint64_t>(rows.at(0).Int(0)), static_cast<uint64_t>(rows.at(0).Int(1)));
}

}  // namespace pare::server
