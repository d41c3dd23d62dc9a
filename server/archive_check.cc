#include "server/archive_check.h"

#include <archive.h>
#include <archive_entry.h>

#include <fstream>
#include <memory>
#include <set>
#include <vector>

namespace pare::server {
// libarchive's error text, which may be null (a corrupt header without a message).
inline std::string ArchiveErrorText(struct archive* a) {
  const char* e = archive_error_string(a);
  return e ? e : "unknown archive error";
}

namespace {

using ArchivePtr = std::unique_ptr<struct archive, int (*)(struct archive*)>;

// A name that stays inside the folder it is extracted to.
bool SafeEntryName(const std::string& name) {
  if (name.empty() || name[0] == '/' || name.find('\\') != std::string::npos) return false;
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    std::string part = name.substr(start, end - start);
    if (part == "..") return false;
    start = end + 1;
  }
  return true;
}

struct Entry {
  std::string name;
  uint64_t size = 0;
};

// Reads every entry (data included, so a declared size cannot hide a bomb).
Result<std::vector<Entry>> ScanArchive(ArchivePtr& a, const std::string& what, const ArchiveLimits& limits,
                                       bool allow_dirs) {
  std::vector<Entry> entries;
  uint64_t total = 0;
  struct archive_entry* e = nullptr;
  std::vector<char> buf(1 << 16);
  while (true) {
    int rc = archive_read_next_header(a.get(), &e);
    if (rc == ARCHIVE_EOF) break;
    if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN) {
      return InvalidArgument(what + " is corrupt or truncated (" + ArchiveErrorText(a.get()) + ")");
    }
    const char* raw_name = archive_entry_pathname(e);
    std::string name = raw_name ? raw_name : "";
    if (!SafeEntryName(name))
      return InvalidArgument(what + " has an entry with an unsafe path: '" + name + "'");
    auto type = archive_entry_filetype(e);
    if (type == AE_IFDIR) {
      if (!allow_dirs) return InvalidArgument(what + " has an unexpected directory entry '" + name + "'");
      continue;
    }
    if (type != AE_IFREG) {
      return InvalidArgument(what + " entry '" + name +
                             "' is not a regular file (links and devices are refused)");
    }
    if (entries.size() + 1 > limits.max_entries) {
      return InvalidArgument(what + " has more than " + std::to_string(limits.max_entries) + " entries");
    }
    uint64_t declared = archive_entry_size_is_set(e) ? static_cast<uint64_t>(archive_entry_size(e)) : 0;
    if (declared > limits.max_uncompressed_bytes || total + declared > limits.max_uncompressed_bytes) {
      return InvalidArgument(what + " declares more than " + std::to_string(limits.max_uncompressed_bytes) +
                             " uncompressed bytes");
    }
    uint64_t actual = 0;
    while (true) {
      la_ssize_t n = archive_read_data(a.get(), buf.data(), buf.size());
      if (n < 0) {
        return InvalidArgument(what + " entry '" + name + "' cannot be read (" + ArchiveErrorText(a.get()) +
                               ")");
      }
      if (n == 0) break;
      actual += static_cast<uint64_t>(n);
      if (total + actual > limits.max_uncompressed_bytes) {
        return InvalidArgument(what + " decompresses to more than " +
                               std::to_string(limits.max_uncompressed_bytes) + " bytes");
      }
      if (archive_entry_size_is_set(e) && actual > declared) {
        return InvalidArgument(what + " entry '" + name + "' decompresses to more than its declared size");
      }
    }
    total += actual;
    entries.push_back({name, actual});
  }
  return entries;
}

ArchivePtr OpenZip(const std::string& path) {
  ArchivePtr a(archive_read_new(), archive_read_free);
  archive_read_support_format_zip_seekable(a.get());
  if (archive_read_open_filename(a.get(), path.c_str(), 1 << 16) != ARCHIVE_OK) a.reset();
  return a;
}

ArchivePtr OpenTar(const std::string& path) {
  ArchivePtr a(archive_read_new(), archive_read_free);
  archive_read_support_format_tar(a.get());
  archive_read_support_format_gnutar(a.get());
  archive_read_support_filter_gzip(a.get());
  if (archive_read_open_filename(a.get(), path.c_str(), 1 << 16) != ARCHIVE_OK) a.reset();
  return a;
}

// Common top folder of a torch.save / TorchScript zip ("name/..."); empty if mixed.
std::string TopFolder(const std::vector<Entry>& entries) {
  std::string top;
  for (const auto& e : entries) {
    auto slash = e.name.find('/');
    if (slash == std::string::npos) return "";
    std::string t = e.name.substr(0, slash);
    if (top.empty())
      top = t;
    else if (t != top)
      return "";
  }
  return top;
}

Status CheckTorchZip(const std::string& path, const ArchiveLimits& limits, bool need_code,
                     const std::string& what) {
  ArchivePtr a = OpenZip(path);
  if (!a) return InvalidArgument(what + " is not a zip archive (truncated or corrupt)");
  PARE_ASSIGN_OR_RETURN(auto entries, ScanArchive(a, what, limits, /*allow_dirs=*/false));
  if (entries.empty()) return InvalidArgument(what + " is an empty zip archive");
  std::string top = TopFolder(entries);
  if (top.empty())
    return InvalidArgument(what + " does not have the PyTorch archive layout (one top folder)");
  bool data_pkl = false, code = false;
  for (const auto& e : entries) {
    if (e.name == top + "/data.pkl") data_pkl = true;
    if (e.name.rfind(top + "/code/", 0) == 0) code = true;
  }
  if (!data_pkl) return InvalidArgument(what + " has no " + top + "/data.pkl: not a PyTorch archive");
  if (need_code && !code) {
    return InvalidArgument(what + " holds no TorchScript code (" + top +
                           "/code/): it looks like a torch.save file, not a torch.jit.save one");
  }
  return Status::Ok();
}

Result<std::vector<unsigned char>> Head(const std::string& path, size_t n) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Internal("cannot read upload");
  std::vector<unsigned char> b(n);
  in.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(n));
  b.resize(static_cast<size_t>(in.gcount()));
  return b;
}

}  // namespace

bool IsKnownDatasetFormat(const std::string& format) {
  return format == "tensors" || format == "idx" || format == "image-folder";
}

Status CheckTorchScriptArchive(const std::string& path, const ArchiveLimits& limits) {
  return CheckTorchZip(path, limits, /*need_code=*/true, "the model");
}

Status CheckDataset(const std::string& path, const std::string& format, const ArchiveLimits& limits) {
  if (format == "tensors") return CheckTorchZip(path, limits, /*need_code=*/false, "the dataset");
  if (format == "idx") {
    PARE_ASSIGN_OR_RETURN(auto head, Head(path, 4));
    const auto& h = head;
    if (h.size() >= 2 && h[0] == 0x1f && h[1] == 0x8b) return Status::Ok();  // gzip: checked by the worker
    if (h.size() == 4 && h[0] == 0 && h[1] == 0 && h[2] == 0x08 && (h[3] == 1 || h[3] == 3 || h[3] == 4)) {
      return Status::Ok();
    }
    ArchivePtr a = OpenTar(path);
    if (!a)
      return InvalidArgument(
          "the dataset is neither an IDX file (wrong magic number) nor a tar of IDX files");
    auto entries = ScanArchive(a, "the dataset tar", limits, /*allow_dirs=*/true);
    if (!entries.ok()) {
      return InvalidArgument("the dataset is neither an IDX file (wrong magic number) nor a valid tar: " +
                             entries.status().message());
    }
    if (entries->empty() || entries->size() > 2) {
      return InvalidArgument("an idx dataset tar must hold an images file and optionally a labels file");
    }
    return Status::Ok();
  }
  if (format == "image-folder") {
    ArchivePtr a = OpenTar(path);
    if (!a) return InvalidArgument("an image-folder dataset must be a tar archive (gzip allowed)");
    PARE_ASSIGN_OR_RETURN(auto entries, ScanArchive(a, "the dataset tar", limits, /*allow_dirs=*/true));
    if (entries.empty()) return InvalidArgument("the dataset tar holds no image files");
    return Status::Ok();
  }
  return InvalidArgument("format must be one of tensors, idx, image-folder; got '" + format + "'");
}

}  // namespace pare::server
