// What the CPU this process runs on can do for int8 inference, read with CPUID.
#pragma once

#include <string>

namespace pare::engine {

struct CpuFeatures {
  bool x86 = false;
  bool avx2 = false;
  bool avx512f = false;
  bool avx512_vnni = false;  // u8*s8 dot products summed in 32 bits (VPDPBUSD)
  bool avx_vnni = false;     // the same on 256-bit registers (Alder Lake and later)
  bool amx_int8 = false;     // Sapphire Rapids' tile int8 multiplies
  std::string model;         // the brand string, e.g. "AMD EPYC 7B13 64-Core Processor"

  // Whether oneDNN's int8 convolutions and matrix products sum in 32 bits here. Without it
  // (x86 with AVX2 alone) they multiply u8*s8 pairs into saturating 16-bit sums
  // (VPMADDUBSW), which full-range 8-bit activations overflow.
  bool FastInt8() const { return avx512_vnni || amx_int8; }
  // "AVX2, AVX-512, AVX-512 VNNI": the vector extensions that matter to LibTorch.
  std::string Extensions() const;
};

// The host's features, read once.
const CpuFeatures& HostCpu();

// How many CPUs this process may keep busy: the CPUs of its affinity mask, capped by the CPU
// quota of its cgroup and of the cgroups above it (a Kubernetes pod's CPU limit: cgroup v2
// `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up, at least 1. `why`
// names what set it, e.g. "affinity mask: 8 CPUs; cgroup CPU quota 2.5 CPUs (/kubepods/...)".
struct CpuBudget {
  int cpus = 1;
  std::string why;
};
// The roots are parameters for tests; the defaults are the live system's.
CpuBudget UsableCpus(const std::string& proc_self_cgroup = "/proc/self/cgroup",
                     const std::string& cgroup_root = "/sys/fs/cgroup", int affinity_cpus = 0);

}  // namespace pare::engine
