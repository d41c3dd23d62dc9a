#include "worker/engine/quant_passes.h"

#include <string>

namespace pare::engine {

torch::jit::Module MakeActivationObserver(const std::string& kind, bool reduce_range) {
  int64_t k = kind == "MINMAX" ? 0 : kind == "MOVING_AVERAGE" ? 1 : kind == "HISTOGRAM" ? 2 : 3;
  torch::jit::Module obs(c10::QualifiedName("__torch__.pare.observers.ActivationObserver"));
  obs.register_attribute("training", c10::BoolType::get(), false);
  obs.register_attribute("min_val", c10::TensorType::get(), at::full({}, INFINITY), false, true);
  obs.register_attribute("max_val", c10::TensorType::get(), at::full({}, -INFINITY), false, true);
  obs.register_attribute("samples", c10::TensorType::get(), at::empty({0}), false, true);
  obs.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(at::kQUInt8));
  obs.register_attribute("qscheme", c10::IntType::get(), static_cast<int64_t>(at::kPerTensorAffine));
  obs.register_attribute("quant_min", c10::IntType::get(), int64_t{0});
  obs.register_attribute("quant_max", c10::IntType::get(), int64_t{reduce_range ? 127 : 255});
  obs.register_attribute("eps", c10::FloatType::get(), 1.1920928955078125e-07);
  obs.register_attribute("is_dynamic", c10::BoolType::get(), false);
  obs.register_attribute("kind", c10::IntType::get(), k);
  obs.register_attribute("seen", c10::BoolType::get(), false);
  obs.register_attribute("averaging_constant", c10::FloatType::get(), 0.01);
  obs.register_attribute("per_batch_samples", c10::IntType::get(), int64_t{16384});
  obs.register_attribute("max_samples", c10::IntType::get(), int64_t{131072});
  obs.register_attribute("percentile", c10::FloatType::get(), 0.9999);
  obs.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    if x.numel() == 0:
        return x
    v = x.detach().float()
    r = v
    if r.dim() == 4 and not r.is_contiguous() and r.is_contiguous(memory_format=2):  # channels_last
        r = r.permute([0, 2, 3, 1])  # the same values, in memory order: reductions run 8x faster
    lo, hi = torch.aminmax(r)
    if self.kind == 1 and self.seen:
        self.min_val = self.min_val + self.averaging_constant * (lo - self.min_val)
        self.max_val = self.max_val + self.averaging_constant * (hi - self.max_val)
    else:
        self.min_val = torch.minimum(lo, self.min_val.to(lo.device))
        self.max_val = torch.maximum(hi, self.max_val.to(hi.device))
    self.seen = True
    if self.kind >= 2:
        # Every step-th value in the tensor's logical (NCHW) order, whatever its layout: in
        # channels-last memory order a step that divides the channel count would sample a few
        # channels only.
        n = v.numel()
        step = max(1, n // self.per_batch_samples)
        picked = torch.take(v, torch.arange(0, n, step, device=v.device))
        kept = torch.cat([self.samples.to(v.device), picked])
        while kept.numel() > self.max_samples:
            kept = kept[::2]
        self.samples = kept
    return x

def _affine(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / float(self.quant_max - self.quant_min), min=self.eps)
    zero_point = torch.clamp(self.quant_min - torch.round(lo / scale), self.quant_min, self.quant_max)
    return scale.reshape([1]), zero_point.long().reshape([1])

def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
    lo = self.min_val
    hi = self.max_val
    s = self.samples
    if self.kind == 3 and s.numel() > 0:
        n = s.numel()
        k_hi = max(1, min(n, int(self.percentile * n + 0.5)))
        k_lo = max(1, min(n, n + 1 - k_hi))
        lo = torch.kthvalue(s, k_lo)[0]
        hi = torch.kthvalue(s, k_hi)[0]
    elif self.kind == 2 and s.numel() > 0:
        # The range whose quantization error over the values is least, among 20 x 20 candidates
        # that clip the low and the high end by 0% to 95% of the observed range. The values are
        # binned (2048 bins over the observed range) and every candidate is scored at once on
        # the bin centres, weighted by their counts: one [400 x 2048] pass.
        bins = 2048
        width = torch.clamp((hi - lo) / float(bins), min=self.eps)
        # The top edge is hi itself, or above it: lo + width * bins rounds below hi for some
        # ranges, and histc drops what lies outside, the extreme values that decide the clipping.
        top = max(float(hi.item()), float(lo.item()) + float(width.item()) * float(bins))
        counts = torch.histc(s, bins, float(lo.item()), top)
        centres = lo + width * (torch.arange(bins, device=s.device).float() + 0.5)
        shrink = 1.0 - 0.05 * torch.arange(20, device=s.device).float()
        clo = torch.clamp((lo * shrink).reshape([20, 1]).expand([20, 20]).reshape([400, 1]), max=0.0)
        chi = torch.clamp((hi * shrink).reshape([1, 20]).expand([20, 20]).reshape([400, 1]), min=0.0)
        scale = torch.clamp((chi - clo) / float(self.quant_max - self.quant_min), min=self.eps)
        zp = torch.clamp(self.quant_min - torch.round(clo / scale), self.quant_min, self.quant_max)
        q = (torch.clamp(torch.round(centres.reshape([1, bins]) / scale) + zp, self.quant_min, self.quant_max) - zp) * scale
        err = ((q - centres.reshape([1, bins])) ** 2 * counts.reshape([1, bins])).sum(1)
        best = int(torch.argmin(err).item())
        lo = (lo * shrink[best // 20]).reshape(lo.shape)
        hi = (hi * shrink[best % 20]).reshape(hi.shape)
    return self._affine(lo, hi)
)JIT");
  return obs;
}

torch::jit::Module MakeWeightObserver(bool per_channel) {
  torch::jit::Module obs(c10::QualifiedName("__torch__.pare.observers.StaticWeightObserver"));
  obs.register_attribute("training", c10::BoolType::get(), false);
  obs.register_attribute("min_val", c10::TensorType::get(), at::empty({0}), false, true);
  obs.register_attribute("max_val", c10::TensorType::get(), at::empty({0}), false, true);
  obs.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(at::kQInt8));
  obs.register_attribute(
      "qscheme", c10::IntType::get(),
      static_cast<int64_t>(per_channel ? at::kPerChannelSymmetric : at::kPerTensorSymmetric));
  obs.register_attribute("ch_axis", c10::IntType::get(), int64_t{0});
  obs.register_attribute("quant_min", c10::IntType::get(), int64_t{-128});
  obs.register_attribute("quant_max", c10::IntType::get(), int64_t{127});
  obs.register_attribute("eps", c10::FloatType::get(), 1.1920928955078125e-07);
  obs.register_attribute("is_dynamic", c10::BoolType::get(), false);
  obs.register_attribute("per_channel", c10::BoolType::get(), per_channel);
  obs.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    if x.numel() == 0:
        return x
    v = x.detach().float()
    if v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=2):  # channels_last
        v = v.permute([0, 2, 3, 1])  # output channels still first; each row's values in memory order
    if self.per_channel:
        flat = v.reshape([v.size(0), -1])
        lo = torch.amin(flat, 1)
        hi = torch.amax(flat, 1)
    else:
        lo = torch.min(v).reshape([1])
        hi = torch.max(v).reshape([1])
    if self.min_val.numel() == 0:
        self.min_val = lo
        self.max_val = hi
    else:
        self.min_val = torch.minimum(lo, self.min_val)
        self.max_val = torch.maximum(hi, self.max_val)
    return x

def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
    amax = torch.maximum(-torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0))
    scale = torch.clamp(amax / (float(self.quant_max - self.quant_min) / 2.0), min=self.eps)
    return scale, torch.zeros_like(scale).long()
)JIT");
  return obs;
}

}  // namespace pare::engine
