#include "worker/dataset_files.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>

namespace pare::worker {
// libarchive's error text, which may be null (a corrupt header without a message).
inline std::string ArchiveErrorText(struct archive* a) {
  const char* e = archive_error_string(a);
  return e ? e : "unknown archive error";
}

namespace {

namespace fs = std::filesystem;

bool LooksLikeTar(const std::string& path) {
  std::unique_ptr<struct archive, int (*)(struct archive*)> a(archive_read_new(), archive_read_free);
  archive_read_support_format_tar(a.get());
  archive_read_support_format_gnutar(a.get());
  archive_read_support_filter_gzip(a.get());
  if (archive_read_open_filename(a.get(), path.c_str(), 1 << 16) != ARCHIVE_OK) return false;
  struct archive_entry* e = nullptr;
  return archive_read_next_header(a.get(), &e) == ARCHIVE_OK;
}

// A path component that is safe to create: not empty, not hidden, not "." or "..", no slash.
bool SafeComponent(const std::string& s) {
  return !s.empty() && s[0] != '.' && s.find('/') == std::string::npos && s.size() < 256;
}

// Extracts regular files of a tar into `dir`. idx: flattened to their base names (at most 16
// files). image-folder: kept as CLASS/FILE (an optional single top folder is dropped), plus
// preprocess.json at the root; nothing deeper.
Status Untar(const std::string& path, const std::string& dir, uint64_t max_bytes, bool keep_classes) {
  std::unique_ptr<struct archive, int (*)(struct archive*)> a(archive_read_new(), archive_read_free);
  archive_read_support_format_tar(a.get());
  archive_read_support_format_gnutar(a.get());
  archive_read_support_filter_gzip(a.get());
  if (archive_read_open_filename(a.get(), path.c_str(), 1 << 16) != ARCHIVE_OK) {
    return InvalidArgument(std::string("the dataset tar cannot be opened: ") + ArchiveErrorText(a.get()));
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  uint64_t total = 0;
  struct archive_entry* e = nullptr;
  int files = 0;
  while (true) {
    int rc = archive_read_next_header(a.get(), &e);
    if (rc == ARCHIVE_EOF) break;
    if (rc != ARCHIVE_OK)
      return InvalidArgument(std::string("the dataset tar is corrupt: ") + ArchiveErrorText(a.get()));
    std::string name = archive_entry_pathname(e) ? archive_entry_pathname(e) : "";
    if (archive_entry_filetype(e) == AE_IFDIR) continue;
    if (archive_entry_filetype(e) != AE_IFREG) {
      return InvalidArgument("dataset tar entry '" + name + "' is not a regular file (links are refused)");
    }
    if (name.empty() || name[0] == '/' || name.find("..") != std::string::npos) {
      return InvalidArgument("dataset tar entry '" + name + "' has an unsafe path");
    }
    std::string base = fs::path(name).filename().string();
    if (base.empty() || base[0] == '.') continue;
    std::string out_path = dir + "/" + base;
    if (keep_classes) {
      std::vector<std::string> parts;
      for (const auto& p : fs::path(name)) {
        if (p.string() != "." && !p.string().empty()) parts.push_back(p.string());
      }
      if (parts.size() == 3) parts.erase(parts.begin());  // "dataset/CLASS/FILE"
      const bool spec = parts.size() == 1 && parts[0] == "preprocess.json";
      if (!spec && (parts.size() != 2 || !SafeComponent(parts[0]) || !SafeComponent(parts[1]))) {
        return InvalidArgument("image-folder tar entry '" + name +
                               "' is not CLASS/IMAGE (or preprocess.json)");
      }
      if (++files > 2000000) return InvalidArgument("the image-folder tar holds too many files");
      if (!spec) {
        fs::create_directories(dir + "/" + parts[0], ec);
        out_path = dir + "/" + parts[0] + "/" + parts[1];
      }
    } else if (++files > 16) {
      return InvalidArgument("an idx dataset tar holds at most an images and a labels file");
    }
    int fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return InvalidArgument("dataset tar entry '" + name + "' is duplicated or cannot be written");
    std::vector<char> buf(1 << 16);
    while (true) {
      la_ssize_t n = archive_read_data(a.get(), buf.data(), buf.size());
      if (n < 0) {
        ::close(fd);
        return InvalidArgument("dataset tar entry '" + name + "' cannot be read");
      }
      if (n == 0) break;
      total += static_cast<uint64_t>(n);
      if (total > max_bytes) {
        ::close(fd);
        return InvalidArgument("the dataset tar unpacks to more than " + std::to_string(max_bytes) +
                               " bytes");
      }
      if (::write(fd, buf.data(), static_cast<size_t>(n)) != n) {
        ::close(fd);
        return Internal("cannot write the unpacked dataset");
      }
    }
    ::close(fd);
  }
  if (files == 0) return InvalidArgument("the dataset tar holds no files");
  return Status::Ok();
}

}  // namespace

Result<engine::DatasetInput> PrepareDataset(const std::string& blob_path, const std::string& format,
                                            const std::string& unpack_dir) {
  if (format == "tensors") return engine::DatasetInput{format, blob_path};
  if (format == "idx") {
    if (!LooksLikeTar(blob_path)) return engine::DatasetInput{format, blob_path};
    PARE_RETURN_IF_ERROR(Untar(blob_path, unpack_dir, uint64_t(8) << 30, false));
    return engine::DatasetInput{format, unpack_dir};
  }
  if (format == "image-folder") {
    PARE_RETURN_IF_ERROR(Untar(blob_path, unpack_dir, uint64_t(16) << 30, true));
    return engine::DatasetInput{format, unpack_dir};
  }
  return InvalidArgument("dataset format '" + format + "' is not supported by this worker");
}

}  // namespace pare::worker
