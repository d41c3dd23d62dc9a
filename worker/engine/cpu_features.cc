#include "worker/engine/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <sched.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

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
  f.model.erase(0, f.model.find_first_not_of(' ') == std::string::npos ? f.model.size()
                                                                       : f.model.find_first_not_of(' '));
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

namespace {

// The CPU quota in a cgroup folder, in CPUs, or 0 when there is none (v2 "max", v1 -1).
double QuotaIn(const std::string& dir) {
  std::ifstream v2(dir + "/cpu.max");
  std::string quota;
  double period = 0;
  if (v2 >> quota >> period) {
    if (quota == "max" || period <= 0) return 0;
    try {
      return std::stod(quota) / period;
    } catch (const std::exception&) {
      return 0;
    }
  }
  std::ifstream q(dir + "/cpu.cfs_quota_us"), p(dir + "/cpu.cfs_period_us");
  double quota_us = 0, period_us = 0;
  if (q >> quota_us && p >> period_us && quota_us > 0 && period_us > 0) return quota_us / period_us;
  return 0;
}

}  // namespace

CpuBudget UsableCpus(const std::string& proc_self_cgroup, const std::string& cgroup_root, int affinity_cpus) {
  CpuBudget b;
  int affinity = affinity_cpus;
  if (affinity <= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    affinity = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  }
  b.cpus = std::max(1, affinity);
  b.why = "affinity mask: " + std::to_string(b.cpus) + " CPU" + (b.cpus == 1 ? "" : "s");
  // The cgroup folders of this process: "0::/path" (v2) or "N:cpu,cpuacct:/path" (v1), each
  // with its ancestors, whose quotas bind it too.
  std::ifstream cg(proc_self_cgroup);
  std::string line;
  double quota = 0;
  std::string where;
  while (std::getline(cg, line)) {
    const auto a = line.find(':'), z = line.find(':', a == std::string::npos ? 0 : a + 1);
    if (a == std::string::npos || z == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, z - a - 1);
    std::string path = line.substr(z + 1);
    std::vector<std::string> roots;
    if (controllers.empty()) {
      roots.push_back(cgroup_root);  // v2, unified
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {
      roots = {cgroup_root + "/cpu,cpuacct", cgroup_root + "/cpu", cgroup_root + "/cpuacct,cpu"};
    } else {
      continue;
    }
    for (const auto& root : roots) {
      for (std::string p = path;; p = p.substr(0, p.rfind('/'))) {
        const double q = QuotaIn(root + (p == "/" ? "" : p));
        if (q > 0 && (quota == 0 || q < quota)) {
          quota = q;
          where = p.empty() ? "/" : p;
        }
        if (p.empty() || p == "/") break;
      }
    }
  }
  if (quota > 0) {
    const int limit = std::max(1, static_cast<int>(std::ceil(quota - 1e-9)));
    std::ostringstream s;
    s << "; cgroup CPU quota " << quota << " CPUs (" << where << ")";
    b.why += s.str();
    if (limit < b.cpus) b.cpus = limit;
  }
  return b;
}

const CpuFeatures& HostCpu() {
  static const CpuFeatures features = Read();
  return features;
}

}  // namespace pare::engine
