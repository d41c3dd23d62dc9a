// image-folder datasets: class folders of PNG/JPEG files, decoded with libpng and libjpeg,
// preprocessed as the folder's preprocess.json says.
#include "worker/engine/image_folder.h"

#include <algorithm>
#include <csetjmp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "worker/engine/error.h"

#ifdef PARE_HAVE_IMAGE_CODECS
#include <jpeglib.h>
#include <png.h>
#endif

namespace pare::engine {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kMaxPixels = int64_t(64) << 20;  // one image, before resizing
constexpr int64_t kMaxImages = 2000000;
constexpr int64_t kMaxDecodedBytes = int64_t(8) << 30;  // the float tensor of the whole set

[[noreturn]] void Bad(const std::string& file, const std::string& what) {
  throw EngineError(Code::kInvalidArgument, "BAD_DATASET", "dataset file '" + file + "': " + what);
}

std::string Lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Bad(path, "cannot be opened");
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

#ifdef PARE_HAVE_IMAGE_CODECS
// HxWxC uint8.
at::Tensor DecodePng(const std::string& path, const std::vector<uint8_t>& bytes, int channels) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, bytes.data(), bytes.size())) {
    Bad(path, std::string("is not a valid PNG (") + image.message + ")");
  }
  if (int64_t(image.width) * int64_t(image.height) > kMaxPixels) {
    png_image_free(&image);
    Bad(path,
        "is " + std::to_string(image.width) + "x" + std::to_string(image.height) + ", larger than allowed");
  }
  // Read with alpha and drop it, as PIL's convert("RGB") does (what torchvision's ImageFolder
  // sees); without an alpha channel in the output libpng would composite onto black.
  image.format = channels == 1 ? PNG_FORMAT_GA : PNG_FORMAT_RGBA;
  at::Tensor out = at::empty({int64_t(image.height), int64_t(image.width), channels + 1}, at::kByte);
  if (!png_image_finish_read(&image, nullptr, out.data_ptr<uint8_t>(), 0, nullptr)) {
    std::string msg = image.message;
    png_image_free(&image);
    Bad(path, "PNG data is corrupt (" + msg + ")");
  }
  return out.slice(2, 0, channels).contiguous();
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void JpegErrorExit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void JpegSilence(j_common_ptr, int) {}

// HxWx4 CMYK (as libjpeg returns it; Adobe's files store it inverted) to HxWxchannels, the way
// PIL converts it (so torchvision's ImageFolder and Pare see the same pixels).
at::Tensor CmykTo(const at::Tensor& cmyk, bool inverted, int channels) {
  at::Tensor v = cmyk.to(at::kFloat);
  if (!inverted) v = 255 - v;  // now (255 - C, 255 - M, 255 - Y, 255 - K)
  at::Tensor rgb = v.slice(2, 0, 3) * v.slice(2, 3, 4) / 255;
  if (channels == 1) rgb = (rgb * at::tensor({0.299f, 0.587f, 0.114f})).sum(2, /*keepdim=*/true);
  return rgb.round().clamp(0, 255).to(at::kByte).contiguous();
}

at::Tensor DecodeJpeg(const std::string& path, const std::vector<uint8_t>& bytes, int channels) {
  jpeg_decompress_struct cinfo{};
  JpegError err{};
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = JpegErrorExit;
  err.mgr.emit_message = JpegSilence;
  at::Tensor out;
  bool inverted_cmyk = false;
  std::string failure;
  // No C++ object with a destructor may live between setjmp and a longjmp back to it.
  if (setjmp(err.jump)) {
    failure = err.message;
  } else {
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, const_cast<unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
    jpeg_read_header(&cinfo, TRUE);
    if (int64_t(cinfo.image_width) * int64_t(cinfo.image_height) > kMaxPixels) {
      failure = "is " + std::to_string(cinfo.image_width) + "x" + std::to_string(cinfo.image_height) +
                ", larger than allowed";
    } else {
      // Print-oriented files (a few in ImageNet) are CMYK or YCCK: libjpeg gives CMYK, converted below.
      const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
      cinfo.out_color_space = cmyk ? JCS_CMYK : channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
      const int components = cmyk ? 4 : channels;
      inverted_cmyk = cmyk && cinfo.saw_Adobe_marker;
      jpeg_start_decompress(&cinfo);
      out = at::empty({int64_t(cinfo.output_height), int64_t(cinfo.output_width), components}, at::kByte);
      const size_t stride = size_t(cinfo.output_width) * size_t(components);
      while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = out.data_ptr<uint8_t>() + size_t(cinfo.output_scanline) * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
      }
      jpeg_finish_decompress(&cinfo);
    }
  }
  jpeg_destroy_decompress(&cinfo);
  if (!failure.empty())
    Bad(path, failure.rfind("is ", 0) == 0 ? failure : "is not a valid JPEG (" + failure + ")");
  return out.size(2) == 4 ? CmykTo(out, inverted_cmyk, channels) : out;
}

#endif  // PARE_HAVE_IMAGE_CODECS

// Shorter side to `size` (bilinear), as torchvision's Resize(int).
at::Tensor ResizeShorter(const at::Tensor& chw, int64_t size) {
  const int64_t h = chw.size(1), w = chw.size(2);
  const int64_t nh = h <= w ? size : std::max<int64_t>(1, (size * h + w / 2) / w);
  const int64_t nw = h <= w ? std::max<int64_t>(1, (size * w + h / 2) / h) : size;
  if (nh == h && nw == w) return chw;
  return at::upsample_bilinear2d(chw.unsqueeze(0), {nh, nw}, /*align_corners=*/false).squeeze(0);
}

at::Tensor CenterCrop(const at::Tensor& chw, int64_t size, const std::string& file) {
  const int64_t h = chw.size(1), w = chw.size(2);
  if (h < size || w < size) {
    Bad(file, "is " + std::to_string(w) + "x" + std::to_string(h) +
                  " after resizing, smaller than the crop " + std::to_string(size));
  }
  const int64_t top = (h - size) / 2, left = (w - size) / 2;
  return chw.slice(1, top, top + size).slice(2, left, left + size);
}

}  // namespace

ImagePreprocess ReadPreprocess(const std::string& folder) {
  ImagePreprocess p;
  const std::string path = folder + "/preprocess.json";
  if (!fs::exists(path)) return p;
  nlohmann::json j;
  try {
    std::ifstream in(path);
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    Bad("preprocess.json", std::string("is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) Bad("preprocess.json", "must be a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const auto& v = it.value();
    auto positive = [&](int64_t& out) {
      if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 4096) {
        Bad("preprocess.json", "'" + k + "' must be an integer in [1, 4096]");
      }
      out = v.get<int64_t>();
    };
    auto floats = [&](std::vector<double>& out) {
      if (!v.is_array() || v.empty() || v.size() > 4)
        Bad("preprocess.json", "'" + k + "' must be a list of 1 to 4 numbers");
      out.clear();
      for (const auto& x : v) {
        if (!x.is_number()) Bad("preprocess.json", "'" + k + "' must hold numbers");
        out.push_back(x.get<double>());
      }
    };
    if (k == "resize")
      positive(p.resize);
    else if (k == "crop")
      positive(p.crop);
    else if (k == "mean")
      floats(p.mean);
    else if (k == "std")
      floats(p.std);
    else if (k == "grayscale") {
      if (!v.is_boolean()) Bad("preprocess.json", "'grayscale' must be true or false");
      p.grayscale = v.get<bool>();
    } else {
      Bad("preprocess.json", "unknown key '" + k + "' (known: resize, crop, mean, std, grayscale)");
    }
  }
  const size_t channels = p.grayscale ? 1 : 3;
  for (const auto* list : {&p.mean, &p.std}) {
    if (!list->empty() && list->size() != channels && list->size() != 1) {
      Bad("preprocess.json", "mean and std need 1 or " + std::to_string(channels) + " values");
    }
  }
  for (double s : p.std) {
    if (!(s > 0)) Bad("preprocess.json", "std values must be positive");
  }
  return p;
}

at::Tensor DecodeImage(const std::string& name, const std::vector<uint8_t>& data, int channels) {
#ifdef PARE_HAVE_IMAGE_CODECS
  // Decide by content, not by name: a .jpg holding PNG data still decodes.
  const bool png = data.size() >= 8 && png_sig_cmp(data.data(), 0, 8) == 0;
  const bool jpeg = data.size() >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF;
  if (!png && !jpeg) Bad(name, "is neither PNG nor JPEG data");
  return png ? DecodePng(name, data, channels) : DecodeJpeg(name, data, channels);
#else
  (void)data;
  (void)channels;
  Bad(name, "this build of Pare has no PNG/JPEG decoding (built without libpng and libjpeg)");
#endif
}

Dataset LoadImageFolder(const std::string& folder) {
  if (!fs::is_directory(folder)) Bad(folder, "an image-folder dataset is a folder of class folders");
  const ImagePreprocess p = ReadPreprocess(folder);
  const int channels = p.grayscale ? 1 : 3;
  std::vector<std::string> classes;
  for (const auto& e : fs::directory_iterator(folder)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && !e.is_symlink() && name[0] != '.') classes.push_back(name);
  }
  std::sort(classes.begin(), classes.end());
  if (classes.empty()) Bad(folder, "holds no class folders");
  std::vector<at::Tensor> images;
  std::vector<int64_t> labels;
  std::vector<int64_t> shape;
  std::string first_file;
  int64_t bytes = 0;
  for (size_t label = 0; label < classes.size(); ++label) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(fs::path(folder) / classes[label])) {
      const std::string ext = Lower(e.path().extension().string());
      if (!e.is_regular_file() || e.is_symlink()) continue;
      if (ext == ".png" || ext == ".jpg" || ext == ".jpeg") files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      const std::string rel = classes[label] + "/" + f.filename().string();
      if (static_cast<int64_t>(images.size()) >= kMaxImages) Bad(rel, "the dataset has too many images");
      at::Tensor hwc = DecodeImage(rel, ReadAll(f.string()), channels);
      at::Tensor chw = hwc.permute({2, 0, 1}).to(at::kFloat).div_(255.0);
      if (p.resize > 0) chw = ResizeShorter(chw, p.resize);
      if (p.crop > 0) chw = CenterCrop(chw, p.crop, rel);
      chw = chw.contiguous();
      if (shape.empty()) {
        shape = chw.sizes().vec();
        first_file = rel;
      } else if (chw.sizes().vec() != shape) {
        Bad(rel, "is " + c10::str(chw.sizes()) + " after preprocessing but " + first_file + " is " +
                     c10::str(at::IntArrayRef(shape)) + "; give resize and crop in preprocess.json");
      }
      bytes += chw.numel() * 4;
      if (bytes > kMaxDecodedBytes) Bad(rel, "the decoded dataset would exceed 8 GiB");
      images.push_back(chw);
      labels.push_back(static_cast<int64_t>(label));
    }
  }
  if (images.empty()) Bad(folder, "holds no PNG or JPEG images");
  Dataset d;
  d.images = at::stack(images);
  if (!p.mean.empty() || !p.std.empty()) {
    auto column = [&](const std::vector<double>& v, double fallback) {
      std::vector<float> f(static_cast<size_t>(channels), static_cast<float>(fallback));
      for (size_t c = 0; c < f.size() && !v.empty(); ++c)
        f[c] = static_cast<float>(v.size() == 1 ? v[0] : v[c]);
      return at::tensor(f).view({1, channels, 1, 1});
    };
    d.images.sub_(column(p.mean, 0.0)).div_(column(p.std, 1.0));
  }
  d.labels = at::tensor(labels, at::TensorOptions().dtype(at::kLong));
  d.class_names = classes;
  return d;
}

}  // namespace pare::engine
