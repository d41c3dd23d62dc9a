#include "client/tar_pack.h"

#include <archive.h>
#include <archive_entry.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

namespace pare::client {
// libarchive's error text, which may be null (a corrupt header without a message).
inline std::string ArchiveErrorText(struct archive* a) {
  const char* e = archive_error_string(a);
  return e ? e : "unknown archive error";
}

namespace {

using ArchivePtr = std::unique_ptr<struct archive, int (*)(struct archive*)>;

Result<ArchivePtr> OpenTar(const std::string& out_tar) {
  ArchivePtr a(archive_write_new(), archive_write_free);
  archive_write_set_format_pax_restricted(a.get());
  if (archive_write_open_filename(a.get(), out_tar.c_str()) != ARCHIVE_OK) {
    return InvalidArgument("cannot write " + out_tar + ": " + ArchiveErrorText(a.get()));
  }
  return a;
}

Status AddFile(struct archive* a, const std::string& path, const std::string& name) {
  std::error_code ec;
  auto size = std::filesystem::file_size(path, ec);
  if (ec) return InvalidArgument("cannot read " + path + ": " + ec.message());
  std::unique_ptr<struct archive_entry, void (*)(struct archive_entry*)> e(archive_entry_new(),
                                                                           archive_entry_free);
  archive_entry_set_pathname(e.get(), name.c_str());
  archive_entry_set_size(e.get(), static_cast<la_int64_t>(size));
  archive_entry_set_filetype(e.get(), AE_IFREG);
  archive_entry_set_perm(e.get(), 0644);
  if (archive_write_header(a, e.get()) != ARCHIVE_OK)
    return Internal(std::string("tar header: ") + ArchiveErrorText(a));
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0 && archive_write_data(a, buf.data(), static_cast<size_t>(in.gcount())) < 0) {
      return Internal(std::string("tar data: ") + ArchiveErrorText(a));
    }
  }
  return Status::Ok();
}

}  // namespace

Status PackImageFolder(const std::string& folder, const std::string& out_tar) {
  namespace fs = std::filesystem;
  PARE_ASSIGN_OR_RETURN(auto a, OpenTar(out_tar));
  std::error_code ec;
  if (fs::exists(fs::path(folder) / "preprocess.json")) {
    PARE_RETURN_IF_ERROR(
        AddFile(a.get(), (fs::path(folder) / "preprocess.json").string(), "preprocess.json"));
  }
  int files = 0;
  for (const auto& cls : fs::directory_iterator(folder, ec)) {
    if (!cls.is_directory() || cls.path().filename().string()[0] == '.') continue;
    for (const auto& f : fs::directory_iterator(cls.path(), ec)) {
      if (!f.is_regular_file() || f.path().filename().string()[0] == '.') continue;
      PARE_RETURN_IF_ERROR(AddFile(a.get(), f.path().string(),
                                   cls.path().filename().string() + "/" + f.path().filename().string()));
      ++files;
    }
  }
  if (ec) return InvalidArgument("cannot list " + folder + ": " + ec.message());
  if (files == 0) return InvalidArgument(folder + " holds no CLASS/IMAGE files");
  if (archive_write_close(a.get()) != ARCHIVE_OK) return Internal("closing " + out_tar + " failed");
  return Status::Ok();
}

Status PackIdxPair(const std::string& images, const std::string& labels, const std::string& out_tar) {
  PARE_ASSIGN_OR_RETURN(auto opened, OpenTar(out_tar));
  ArchivePtr a = std::move(opened);
  for (const auto& [path, name] :
       {std::pair<std::string, std::string>{images, "images"}, {labels, "labels"}}) {
    std::error_code ec;
    auto size = std::filesystem::file_size(path, ec);
    if (ec) return InvalidArgument("cannot read " + path + ": " + ec.message());
    bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
    std::unique_ptr<struct archive_entry, void (*)(struct archive_entry*)> e(archive_entry_new(),
                                                                             archive_entry_free);
    archive_entry_set_pathname(e.get(), (name + (gz ? ".idx.gz" : ".idx")).c_str());
    archive_entry_set_size(e.get(), static_cast<la_int64_t>(size));
    archive_entry_set_filetype(e.get(), AE_IFREG);
    archive_entry_set_perm(e.get(), 0644);
    if (archive_write_header(a.get(), e.get()) != ARCHIVE_OK) {
      return Internal(std::string("tar header: ") + ArchiveErrorText(a.get()));
    }
    std::ifstream in(path, std::ios::binary);
    std::vector<char> buf(1 << 20);
    while (in) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      if (in.gcount() > 0 && archive_write_data(a.get(), buf.data(), static_cast<size_t>(in.gcount())) < 0) {
        return Internal(std::string("tar data: ") + ArchiveErrorText(a.get()));
      }
    }
  }
  if (archive_write_close(a.get()) != ARCHIVE_OK) return Internal("closing " + out_tar + " failed");
  return Status::Ok();
}

}  // namespace pare::client
