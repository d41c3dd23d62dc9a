#include "server/blob_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "common/ids.h"

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
  if (::fsync(fd_) != 0) {
    std::string err = std::strerror(errno);
    Abort();
    return Internal("fsync blob: " + err);
  }
  ::close(fd_);
  fd_ = -1;
  const std::string final_path = store_->PathOf(digest);
  const std::string dir = fs::path(final_path).parent_path().string();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    Abort();
    return Internal("cannot create " + dir + ": " + ec.message());
  }
  if (store_->Exists(digest)) {
    ::unlink(temp_path_.c_str());  // stored once
  } else if (::rename(temp_path_.c_str(), final_path.c_str()) != 0) {
    std::string err = std::strerror(errno);
    Abort();
    return Internal("rename blob: " + err);
  }
  done_ = true;
  PARE_RETURN_IF_ERROR(FsyncDir(dir));
  return digest;
}

Result<std::unique_ptr<BlobStore>> BlobStore::Open(const std::string& root, bool shared) {
  std::error_code ec;
  fs::create_directories(root + "/blobs", ec);
  if (ec) return Internal("cannot create " + root + "/blobs: " + ec.message());
  fs::create_directories(root + "/tmp", ec);
  if (ec) return Internal("cannot create " + root + "/tmp: " + ec.message());
  // Anything in tmp/ was never acknowledged: a crash interrupted its upload. Where several servers
  // share the folder (a ReadWriteMany volume), another's upload in progress keeps writing its
  // file: then only files left untouched for an hour are a crash's.
  const auto stale = fs::file_time_type::clock::now() - std::chrono::hours(1);
  for (const auto& e : fs::directory_iterator(root + "/tmp", ec)) {
    std::error_code age_ec;
    const auto written = fs::last_write_time(e.path(), age_ec);
    if (!shared || age_ec || written < stale) fs::remove_all(e.path(), ec);
  }
  return std::unique_ptr<BlobStore>(new BlobStore(root));
}

Result<std::unique_ptr<BlobWriter>> BlobStore::NewWriter(uint64_t limit_bytes) {
  std::string path = tmp_dir() + "/" + NewId("upload");
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Internal("cannot create temporary file: " + std::string(std::strerror(errno)));
  return std::unique_ptr<BlobWriter>(new BlobWriter(this, path, fd, limit_bytes));
}

bool BlobStore::Exists(const std::string& sha256) const {
  struct stat st;
  return IsHexSha256(sha256) && ::stat(PathOf(sha256).c_str(), &st) == 0;
}

std::string BlobStore::PathOf(const std::string& sha256) const {
  return root_ + "/blobs/" + sha256.substr(0, 2) + "/" + sha256;
}

Result<uint64_t> BlobStore::SizeOf(const std::string& sha256) const {
  struct stat st;
  if (!IsHexSha256(sha256) || ::stat(PathOf(sha256).c_str(), &st) != 0) {
    return NotFound("blob " + sha256 + " is missing from the blob store");
  }
  return static_cast<uint64_t>(st.st_size);
}

Result<std::string> BlobStore::PutBytes(const std::string& bytes) {
  PARE_ASSIGN_OR_RETURN(auto w, NewWriter(bytes.size()));
  PARE_RETURN_IF_ERROR(w->Append(bytes.data(), bytes.size()));
  return w->Commit(bytes.size(), "");
}

std::pair<uint64_t, uint64_t> BlobStore::CountAndBytes() const {
  uint64_t count = 0, bytes = 0;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(root_ + "/blobs", ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    ++count;
    bytes += it->file_size(ec);
  }
  return {count, bytes};
}

}  // namespace pare::server
