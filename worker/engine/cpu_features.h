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

}  // namespace pare::engine
