#include "worker/engine/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <cstring>

namespace pare::engine {
namespace {

CpuFeatures Read() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  f.x86 = true;
  unsigned a = 0, b = 0, c = 0, d = 0;
  const unsigned max_leaf = __get_cpuid_max(0, nullptr);
  // The OS must save the wide registers too (XCR0), or the instructions fault.
  bool os_avx = false, os_avx512 = false, os_amx = false;
  if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_OSXSAVE)) {
    unsigned lo = 0, hi = 0;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    os_avx = (lo & 0x6) == 0x6;
    os_avx512 = os_avx && (lo & 0xe0) == 0xe0;
    (void)hi;
    os_amx = (lo & (3u << 17)) == (3u << 17);  // XTILECFG and XTILEDATA state
  }
  if (max_leaf >= 7 && __get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = os_avx && (b & (1u << 5));
    f.avx512f = os_avx512 && (b & (1u << 16));
    f.avx512_vnni = f.avx512f && (c & (1u << 11));
    f.amx_int8 = os_amx && (d & (1u << 25));
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx_vnni = os_avx && (a & (1u << 4));
  }
  char brand[49] = {};
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    for (unsigned i = 0; i < 3; ++i) {
      __get_cpuid(0x80000002 + i, &a, &b, &c, &d);
      std::memcpy(brand + 16 * i, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
  }
  f.model = brand;
  while (!f.model.empty() && f.model.back() == ' ') f.model.pop_back();
  f.model.erase(0, f.model.find_first_not_of(' ') == std::string::npos ? f.model.size() : f.model.find_first_not_of(' '));
#endif
  return f;
}

}  // namespace

std::string CpuFeatures::Extensions() const {
  if (!x86) return "not x86";
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (on) s += std::string(s.empty() ? "" : ", ") + name;
  };
  add(avx2, "AVX2");
  add(avx512f, "AVX-512");
  add(avx512_vnni, "AVX-512 VNNI");
  add(avx_vnni, "AVX-VNNI");
  add(amx_int8, "AMX-INT8");
  return s.empty() ? "no AVX2" : s;
}

const CpuFeatures& HostCpu() {
  static const CpuFeatures features = Read();
  return features;
}

}  // namespace pare::engine
