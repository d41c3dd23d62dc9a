#include "worker/engine/dataset.h"

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include "worker/engine/error.h"
#include "worker/engine/image_folder.h"

namespace pare::engine {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void Bad(const std::string& file, const std::string& what) {
  throw EngineError(Code::kInvalidArgument, "BAD_DATASET", "dataset file '" + file + "': " + what);
}

// Reads a whole file, gunzipping it when it is gzip (zlib reads plain files as they are).
std::vector<uint8_t> ReadMaybeGzip(const std::string& path, size_t limit) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) Bad(path, "cannot be opened");
  std::vector<uint8_t> out;
  std::vector<uint8_t> buf(1 << 20);
  while (true) {
    int n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()));
    if (n < 0) {
      int err = 0;
      std::string msg = gzerror(f, &err);
      gzclose(f);
      Bad(path, "corrupt compressed data (" + msg + ")");
    }
    if (n == 0) break;
    out.insert(out.end(), buf.begin(), buf.begin() + n);
    if (out.size() > limit) {
      gzclose(f);
      Bad(path, "larger than " + std::to_string(limit) + " bytes once decompressed");
    }
  }
  gzclose(f);
  return out;
}

uint32_t BigEndian32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

constexpr size_t kMaxDatasetBytes = size_t(8) << 30;

// An IDX file of unsigned bytes: returns its dimensions and a uint8 tensor.
at::Tensor ReadIdx(const std::string& path, int expected_dims) {
  auto bytes = ReadMaybeGzip(path, kMaxDatasetBytes);
  if (bytes.size() < 4) Bad(path, "too short for an IDX header");
  if (bytes[0] != 0 || bytes[1] != 0) Bad(path, "wrong magic number (not an IDX file)");
  if (bytes[2] != 0x08)
    Bad(path, "element type 0x" + std::to_string(bytes[2]) + " is not unsigned byte (0x08)");
  int dims = bytes[3];
  if (dims != expected_dims) {
    Bad(path, "has " + std::to_string(dims) + " dimensions, expected " + std::to_string(expected_dims));
  }
  size_t header = 4 + 4 * size_t(dims);
  if (bytes.size() < header) Bad(path, "truncated IDX header");
  std::vector<int64_t> shape;
  uint64_t count = 1;
  for (int d = 0; d < dims; ++d) {
    uint32_t v = BigEndian32(bytes.data() + 4 + 4 * d);
    if (v == 0) Bad(path, "dimension " + std::to_string(d) + " is zero");
    shape.push_back(v);
    count *= v;
    if (count > kMaxDatasetBytes) Bad(path, "declares more elements than allowed");
  }
  if (bytes.size() - header != count) {
    Bad(path, "header declares " + std::to_string(count) + " bytes of data but the file holds " +
                  std::to_string(bytes.size() - header));
  }
  at::Tensor t = at::empty(shape, at::kByte);
  std::memcpy(t.data_ptr<uint8_t>(), bytes.data() + header, count);
  return t;
}

// The dimension count from an IDX header, reading only its first 4 bytes.
int IdxDims(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) Bad(path, "cannot be opened");
  uint8_t head[4];
  int n = gzread(f, head, sizeof head);
  gzclose(f);
  if (n != 4 || head[0] != 0 || head[1] != 0) Bad(path, "wrong magic number (not an IDX file)");
  return head[3];
}

Dataset LoadIdx(const std::string& path) {
  std::string images_path, labels_path;
  if (fs::is_directory(path)) {
    for (const auto& e : fs::directory_iterator(path)) {
      if (!e.is_regular_file()) continue;
      int dims = IdxDims(e.path().string());
      if (dims == 3 || dims == 4) {
        if (!images_path.empty()) Bad(e.path().string(), "a second images file in the dataset");
        images_path = e.path().string();
      } else if (dims == 1) {
        if (!labels_path.empty()) Bad(e.path().string(), "a second labels file in the dataset");
        labels_path = e.path().string();
      } else {
        Bad(e.path().string(), "has " + std::to_string(dims) + " dimensions (images 3, labels 1)");
      }
    }
    if (images_path.empty()) Bad(path, "holds no IDX images file (3 dimensions)");
  } else {
    images_path = path;
  }
  Dataset ds;
  int dims = IdxDims(images_path);
  at::Tensor images = ReadIdx(images_path, dims == 4 ? 4 : 3);
  if (images.dim() == 3) images = images.unsqueeze(1);
  ds.images = images.to(at::kFloat).div_(255.0);
  if (!labels_path.empty()) {
    at::Tensor labels = ReadIdx(labels_path, 1).to(at::kLong);
    if (labels.size(0) != images.size(0)) {
      Bad(labels_path,
          std::to_string(labels.size(0)) + " labels for " + std::to_string(images.size(0)) + " images");
    }
    ds.labels = labels;
  }
  return ds;
}

// The bytes of a torch.save file, in memory, for PyTorchStreamReader.
class BytesAdapter final : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit BytesAdapter(const std::vector<char>& bytes) : bytes_(bytes) {}
  size_t size() const override { return bytes_.size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= bytes_.size()) return 0;
    n = std::min<size_t>(n, bytes_.size() - pos);
    std::memcpy(buf, bytes_.data() + pos, n);
    return n;
  }

 private:
  const std::vector<char>& bytes_;
};

// LibTorch 1.13's unpickler has no SETITEM, the opcode Python writes for a dict of one item
// (`torch.save({"images": x})`); dicts of several items use MARK ... SETITEMS, which it has.
// Rewrites a top-level one-item dict that way and unpickles it with the file's tensors.
c10::IValue LoadOneItemDict(const std::vector<char>& bytes) {
  caffe2::serialize::PyTorchStreamReader reader(std::make_shared<BytesAdapter>(bytes));
  auto [data, size] = reader.getRecord("data.pkl");
  std::string pkl(static_cast<const char*>(data.get()), size);
  // PROTO 2, EMPTY_DICT, an optional BINPUT/LONG_BINPUT, ..., SETITEM, STOP.
  size_t at = 2;
  if (pkl.size() < 6 || pkl.compare(0, 2, "\x80\x02") != 0 || pkl[at] != '}' || pkl.back() != '.' ||
      pkl[pkl.size() - 2] != 's') {
    throw std::runtime_error("not a dict of one item");
  }
  ++at;
  if (pkl[at] == 'q')
    at += 2;
  else if (pkl[at] == 'r')
    at += 5;
  pkl[pkl.size() - 2] = 'u';
  pkl.insert(at, 1, '(');
  size_t pos = 0;
  torch::jit::Unpickler unpickler(
      [&](char* buf, size_t n) {
        n = std::min(n, pkl.size() - pos);
        std::memcpy(buf, pkl.data() + pos, n);
        pos += n;
        return n;
      },
      nullptr, nullptr,
      [&](const std::string& name) { return std::get<0>(reader.getRecord("data/" + name)); },
      c10::Device(c10::kCPU));
  return unpickler.parse_ivalue();
}

// The dict a torch.save file holds; BAD_DATASET when it is no such file or not a dict.
c10::impl::GenericDict ReadTensorsFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) Bad(path, "cannot be opened");
  // One read of the whole file, not a byte at a time through a stream iterator.
  const std::streamoff size = in.tellg();
  if (size < 0) Bad(path, "cannot be read");
  std::vector<char> bytes(static_cast<size_t>(size));
  in.seekg(0);
  if (!in.read(bytes.data(), size)) Bad(path, "cannot be read");
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(bytes);
  } catch (const c10::Error& e) {
    try {
      value = LoadOneItemDict(bytes);
    } catch (const std::exception&) {
      Bad(path, std::string("is not a torch.save file (of torch >= 1.6's zip format): ") +
                    e.what_without_backtrace());
    }
  } catch (const std::exception& e) {
    Bad(path, std::string("is not a torch.save file: ") + e.what());
  }
  if (!value.isGenericDict())
    Bad(path, "holds " + value.tagKind() + ", expected a dict with 'images' and 'labels'");
  return value.toGenericDict();
}

// Images as float (uint8 ones scaled to [0, 1]), contiguous.
at::Tensor AsFloatImages(const std::string& path, const std::string& key, const at::Tensor& t) {
  if (t.scalar_type() == at::kByte) return t.to(at::kFloat).div_(255.0).contiguous();
  if (!t.is_floating_point()) {
    Bad(path, "'" + key + "' has dtype " + std::string(c10::toString(t.scalar_type())) +
                  ", expected float or uint8");
  }
  return t.to(at::kFloat).contiguous();
}

// "'a', 'b', ..." for a message about a dict's keys.
std::string KeyList(const c10::impl::GenericDict& dict) {
  std::string keys;
  for (const auto& kv : dict) {
    if (keys.size() > 200) return keys + ", ...";
    keys += (keys.empty() ? "" : ", ") +
            (kv.key().isString() ? "'" + kv.key().toStringRef() + "'" : kv.key().tagKind());
  }
  return keys.empty() ? std::string("none") : keys;
}

Dataset LoadTensors(const std::string& path) {
  const c10::impl::GenericDict dict = ReadTensorsFile(path);
  Dataset ds;
  std::map<int, at::Tensor> more;  // "images_<i>": forward's further inputs
  for (const auto& kv : dict) {
    if (!kv.key().isString()) continue;
    const std::string& k = kv.key().toStringRef();
    int index = 0;
    if (k.rfind("images_", 0) == 0) {
      const std::string digits = k.substr(7);
      if (digits.empty() || digits.size() > 2 ||
          digits.find_first_not_of("0123456789") != std::string::npos || (index = std::stoi(digits)) < 1 ||
          index > 15) {
        Bad(path, "'" + k + "': further inputs are named images_1 ... images_15");
      }
    } else if (k != "images" && k != "labels") {
      continue;
    }
    if (!kv.value().isTensor()) Bad(path, "'" + k + "' is " + kv.value().tagKind() + ", not a tensor");
    if (index > 0)
      more[index] = kv.value().toTensor();
    else
      (k == "images" ? ds.images : ds.labels) = kv.value().toTensor();
  }
  if (!ds.images.defined()) {
    Bad(path, "has no 'images' tensor (its keys: " + KeyList(dict) +
                  "; a tensors file is a dict of 'images', N first, and optionally 'labels')");
  }
  if (ds.images.dim() < 2 || ds.images.dim() > 6) {
    Bad(path,
        "'images' has " + std::to_string(ds.images.dim()) +
            " dimensions, expected 2 to 6, batch first (N x C x H x W for images, N x C x L for signals)");
  }
  ds.rank3_ambiguous = ds.images.dim() == 3;
  const int64_t n = ds.images.size(0);
  if (n == 0) Bad(path, "'images' is empty");
  ds.images = AsFloatImages(path, "images", ds.images);
  for (const auto& [index, t] : more) {
    const std::string key = "images_" + std::to_string(index);
    if (index != static_cast<int>(ds.more_images.size()) + 1)
      Bad(path, "has '" + key + "' without the ones before it");
    if (t.dim() < 2 || t.size(0) != n) {
      Bad(path, "'" + key + "' must have one entry per image (" + std::to_string(n) + "), batch first");
    }
    ds.more_images.push_back(AsFloatImages(path, key, t));
  }
  if (ds.labels.defined()) {
    if (ds.labels.dim() != 1 || ds.labels.size(0) != n) {
      Bad(path, "'labels' must be one label per image (" + std::to_string(n) + ")");
    }
    if (ds.labels.is_floating_point() || ds.labels.scalar_type() == at::kBool)
      Bad(path, "'labels' must be integers");
    ds.labels = ds.labels.to(at::kLong);
    if (ds.labels.min().item<int64_t>() < 0) Bad(path, "'labels' has negative values");
  }
  return ds;
}

}  // namespace

// A NaN or infinity in the inputs would surface far from its cause (a calibration histogram
// "of range [nan, nan]", a training loss of nan): refused here, with where it is.
static void CheckFinite(const at::Tensor& images, const std::string& name) {
  if (!images.defined() || !images.is_floating_point()) return;
  at::Tensor bad = ~at::isfinite(images).flatten(1).all(1);
  if (!bad.any().item<bool>()) return;
  const int64_t first = bad.nonzero()[0][0].item<int64_t>();
  throw EngineError(Code::kInvalidArgument, "BAD_DATASET",
                    "'" + name + "' holds NaN or infinite values in " +
                        std::to_string(bad.sum().item<int64_t>()) + " sample(s), the first at index " +
                        std::to_string(first));
}

Dataset LoadDataset(const std::string& format, const std::string& path) {
  Dataset ds;
  if (format == "tensors")
    ds = LoadTensors(path);
  else if (format == "idx")
    ds = LoadIdx(path);
  else if (format == "image-folder")
    ds = LoadImageFolder(path);
  else {
    throw EngineError(Code::kInvalidArgument, "BAD_DATASET",
                      "dataset format '" + format + "' is not supported (tensors, idx, image-folder)");
  }
  CheckFinite(ds.images, "images");
  for (size_t i = 0; i < ds.more_images.size(); ++i)
    CheckFinite(ds.more_images[i], "images_" + std::to_string(i + 1));
  return ds;
}

}  // namespace pare::engine
