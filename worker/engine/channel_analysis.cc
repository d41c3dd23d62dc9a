#include "worker/engine/channel_analysis.h"

#include <torch/csrc/jit/ir/constants.h>

#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <tuple>
#include <unordered_map>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/model_util.h"

namespace pare::engine::channels {

bool In(c10::Symbol k, std::initializer_list<c10::Symbol> set) {
  return std::find(set.begin(), set.end(), k) != set.end();
}

void Analysis::Run() {
  Visit(graph_->block());
  for (Value* v : graph_->outputs()) {
    Block(Of(v), "it reaches the model's output");
    auto d = dicts_.find(v);  // a returned dict: what it holds is the output
    if (d == dicts_.end()) continue;
    for (const auto& [key, held] : d->second) Block(Of(held), "it reaches the model's output");
  }
}

void Analysis::Union(int a, int b) {
  a = Find(a);
  b = Find(b);
  if (a == b) return;
  if (atoms_[a].size != atoms_[b].size) {
    BlockRoot(a, "channel counts disagree");
    BlockRoot(b, "channel counts disagree");
    return;
  }
  atoms_[b].parent = a;
  atoms_[a].granule = std::lcm(atoms_[a].granule, atoms_[b].granule);
  atoms_[a].multiple = std::lcm(atoms_[a].multiple, atoms_[b].multiple);
  if (atoms_[a].size % atoms_[a].granule != 0)
    BlockRoot(a, "grouped convolutions with incompatible group sizes");
  if (atoms_[a].size % std::lcm(atoms_[a].granule, atoms_[a].multiple) != 0) {
    BlockRoot(a, "group norms and grouped convolutions whose group sizes do not fit together");
  }
  if (atoms_[b].blocked) BlockRoot(a, atoms_[b].why);
}

void Analysis::Elementwise(Node* n, const std::vector<Value*>& operands) {
  Space result;
  int64_t rank = -1;
  int64_t cdim = 1;
  bool ok = true;
  std::vector<Value*> unknown;
  for (Value* v : operands) {
    Space s = Of(v);
    if (s.empty()) {
      unknown.push_back(v);
      continue;
    }
    if (const Shape* sh = ShapeOf(v)) rank = std::max<int64_t>(rank, static_cast<int64_t>(sh->size()));
    if (result.empty()) {
      result = s;
      cdim = CDim(v);
      continue;
    }
    bool same = result.size() == s.size() && CDim(v) == cdim;
    for (size_t i = 0; same && i < s.size(); ++i) {
      same = result[i].size == s[i].size && result[i].factor == s[i].factor;
    }
    if (!same) {
      ok = false;
      Block(s, "an elementwise op (" + OpName(n) + ") joins differently laid-out channels");
      continue;
    }
    for (size_t i = 0; i < s.size(); ++i) Union(result[i].atom, s[i].atom);
  }
  if (result.empty()) return;
  const bool flat = Flattened(result);
  for (Value* v : unknown) {
    const Shape* sh = ShapeOf(v);
    if (!sh || rank < 0) {
      ok = false;
      break;
    }
    int64_t index = cdim - (rank - static_cast<int64_t>(sh->size()));  // v's dim aligned with the channels
    if (index < 0 || (*sh)[index] == 1) continue;
    // A per-channel parameter (ConvNeXt's layer scale, shape [C, 1, 1]) is cut with them.
    Source src = Resolve(root_, v, self_);
    if (!flat && src.kind == Source::kAttr && (*sh)[index] == Length(result)) {
      AddMember(result, Role::kChannelParam, {src.path}, index);
      continue;
    }
    ok = false;
    break;
  }
  if (!ok) {
    Block(result, OpName(n) + " combines the channels with a tensor that has as many fixed channels");
    return;
  }
  Set(n->output(0), result, cdim);
}

void Analysis::Dict(Node* n) {
  if (n->kind() == prim::DictConstruct || n->kind() == aten::dict) {  // built, or empty
    Value* d = n->output();
    bool local = true;
    for (const auto& use : d->uses()) {
      const auto k = use.user->kind();
      if (use.user == graph_->return_node()) continue;
      local &= (k == aten::_set_item || k == aten::__getitem__) && use.offset == 0 &&
               !DictKey(use.user->input(1)).empty() &&
               (k == aten::__getitem__ || use.user->owningBlock() == graph_->block());
    }
    for (size_t i = 0; local && i + 1 < n->inputs().size(); i += 2) local = !DictKey(n->input(i)).empty();
    if (!local) return BlockTensorInputs(n, "a dict of tensors");
    auto& held = dicts_[d];
    for (size_t i = 0; i + 1 < n->inputs().size(); i += 2) held[DictKey(n->input(i))] = n->input(i + 1);
    return;
  }
  auto& held = dicts_[n->input(0)];
  const std::string key = DictKey(n->input(1));
  if (n->kind() == aten::_set_item) {
    held[key] = n->input(2);
    return;
  }
  auto it = held.find(key);
  if (it != held.end() && IsTensor(n->output())) Set(n->output(), Of(it->second), CDim(it->second));
}

namespace {

// Reads that adapt to any channel count.
bool AdaptsToChannels(c10::Symbol k) {
  return In(k, {prim::Constant,
                prim::GetAttr,
                aten::size,
                aten::dim,
                aten::len,
                aten::__is__,
                aten::__isnot__,
                prim::isinstance,
                aten::is_floating_point,
                prim::device,
                prim::dtype,
                prim::requires_grad,
                aten::format,
                prim::RaiseException,
                aten::warn,
                prim::Uninitialized,
                c10::Symbol::fromQualString("aten::numel"),
                aten::Int,
                aten::Float,
                aten::Bool,
                aten::ScalarImplicit,
                prim::is_cuda});
}

// Ops applied channel by channel (or elementwise between operands).
bool IsPointwise(c10::Symbol k) {
  return In(
      k,
      {aten::relu, aten::relu_, aten::relu6, aten::relu6_, aten::hardtanh, aten::hardtanh_, aten::sigmoid,
       aten::sigmoid_, aten::hardsigmoid, aten::hardsigmoid_, aten::hardswish, aten::hardswish_, aten::silu,
       aten::silu_, aten::gelu, aten::elu, aten::elu_, aten::leaky_relu, aten::leaky_relu_, aten::tanh,
       aten::tanh_, aten::mish, aten::softplus, aten::dropout, aten::dropout_, aten::feature_dropout,
       aten::feature_dropout_, aten::alpha_dropout, aten::alpha_dropout_, aten::feature_alpha_dropout,
       aten::contiguous, aten::clone, aten::detach, aten::neg, aten::clamp, aten::clamp_, aten::clamp_min,
       aten::clamp_min_, aten::clamp_max, aten::to, aten::add, aten::add_, aten::sub, aten::sub_, aten::mul,
       aten::mul_, aten::div, aten::div_, aten::maximum, aten::minimum, aten::exp, aten::sqrt,
       // Along the channels too: with fewer channels they normalise over the ones kept.
       aten::softmax, aten::log_softmax});
}

// Pools and resampling: the same channels, other spatial sizes.
bool IsSpatial(c10::Symbol k) {
  return In(k, {aten::max_pool1d,
                aten::max_pool2d,
                aten::max_pool3d,
                aten::avg_pool1d,
                aten::avg_pool2d,
                aten::avg_pool3d,
                aten::adaptive_avg_pool1d,
                aten::adaptive_avg_pool2d,
                aten::adaptive_avg_pool3d,
                aten::adaptive_max_pool1d,
                aten::adaptive_max_pool2d,
                aten::adaptive_max_pool3d,
                aten::max_pool1d_with_indices,
                aten::max_pool2d_with_indices,
                aten::max_pool3d_with_indices,
                aten::upsample_nearest1d,
                aten::upsample_nearest2d,
                aten::upsample_nearest3d,
                aten::upsample_linear1d,
                aten::upsample_bilinear2d,
                aten::upsample_bicubic2d,
                aten::upsample_trilinear3d});
}

}  // namespace

void Analysis::VisitNode(Node* n) {
  const auto k = n->kind();
  // A branch on the input's rank or sizes that never ran on the probe (InstanceNorm's path
  // for unbatched inputs) has no shapes to analyse and cannot run on inputs of this shape.
  const bool static_if = k == prim::If && ShapeDerived(n->input(0), 0);
  for (torch::jit::Block* b : n->blocks()) {
    if (static_if && NeverRan(b))
      skipped_.insert(b);
    else
      Visit(b);
  }
  if (AdaptsToChannels(k)) return;
  if (k == prim::unchecked_cast) return Set(n->output(), Of(n->input(0)), CDim(n->input(0)));
  if (In(k, {aten::conv1d, aten::conv2d, aten::conv3d, aten::_convolution})) return Conv(n);
  if (In(k, {aten::conv_transpose1d, aten::conv_transpose2d, aten::conv_transpose3d}))
    return ConvTranspose(n, 6);
  if (k == aten::group_norm) return GroupNorm(n);
  if (k == aten::instance_norm) return Norm(n, "an instance norm");
  if (k == prim::TupleConstruct && Returned(n->output())) {
    return BlockTensorInputs(n, "it reaches the model's output");
  }
  if (In(k, {aten::pixel_shuffle, aten::pixel_unshuffle})) {
    return BlockTensorInputs(n, OpName(n) + " ties channels to spatial positions" + Code(n));
  }
  if (In(k, {aten::chunk, aten::split, aten::split_with_sizes, aten::unsafe_chunk, aten::unsafe_split,
             aten::tensor_split, aten::unbind})) {
    return BlockTensorInputs(n, OpName(n) + " splits the channels into parts" + Code(n));
  }
  if (k == aten::linear) return Linear(n);
  if (k == aten::permute) return Permute(n);
  if (k == aten::layer_norm) return LayerNorm(n);
  if (k == aten::batch_norm) return Norm(n, "a batch norm");
  if (k == aten::prelu) return PRelu(n);
  if (IsPointwise(k)) return Pointwise(n);
  if (IsSpatial(k)) return Spatial(n);
  if (In(k, {aten::mean, aten::sum, aten::amax})) return Reduce(n);
  if (In(k, {aten::flatten, aten::view, aten::reshape, aten::squeeze, aten::unsqueeze})) return Reshape(n);
  const bool dict_op = (k == aten::_set_item || k == aten::__getitem__) && dicts_.count(n->input(0));
  if (k == prim::DictConstruct || (k == aten::dict && n->inputs().empty()) || dict_op) return Dict(n);
  if (k == prim::ListConstruct) return List(n);
  if (k == aten::cat) return Cat(n);
  if (k == prim::If) return If(n);
  if (k == prim::Loop) {
    BlockTensorInputs(n, "a loop" + Code(n));
    for (Value* v : n->blocks()[0]->outputs()) Block(Of(v), "a loop" + Code(n));
    return;
  }
  BlockTensorInputs(n, OpName(n) + Code(n));
}

// A list of tensors is followed only as the first argument of a cat.
void Analysis::List(Node* n) {
  if (Returned(n->output())) return BlockTensorInputs(n, "it reaches the model's output");
  for (const auto& use : n->output()->uses()) {
    if (!(use.user->kind() == aten::cat && use.offset == 0)) {
      return BlockTensorInputs(n, "a list of tensors" + Code(use.user));
    }
  }
}

bool Analysis::ShapeDerived(Value* v, int depth) {
  if (depth > 32 || IsTensor(v)) return false;
  Node* d = v->node();
  const auto k = d->kind();
  if (k == prim::Constant || In(k, {aten::dim, aten::size, aten::len, aten::__is__, aten::__isnot__}))
    return true;
  if (k == prim::If) {  // `a and b`: a condition, then a value per branch
    if (!ShapeDerived(d->input(0), depth + 1)) return false;
    for (torch::jit::Block* b : d->blocks()) {
      for (Value* out : b->outputs()) {
        if (!ShapeDerived(out, depth + 1)) return false;
      }
    }
    return true;
  }
  if (In(k, {prim::Param, prim::GetAttr, prim::CallMethod, prim::CallFunction, prim::Loop})) return false;
  for (Value* in : d->inputs()) {
    if (!ShapeDerived(in, depth + 1)) return false;
  }
  return true;
}

bool Analysis::NeverRan(torch::jit::Block* b) {
  bool makes = false, seen = false;
  ForEachNode(b, [&](Node* n) {
    for (Value* o : n->outputs()) {
      if (!IsTensor(o) || n->kind() == prim::Uninitialized) continue;
      makes = true;
      seen |= shapes_.count(o) > 0;
    }
  });
  return makes && !seen;
}

std::string Analysis::Code(Node* n) {
  // The user's own source when the file kept it (debug info), else the serialized code. A
  // traced model's debug info can hold ranges LibTorch 1.13 cannot read back (its
  // source_range.h asserts): then the serialized code, else the op's name alone.
  auto describe = [](const torch::jit::SourceRange& range) -> std::string {
    if (!range.source()) return "";
    std::string text(range.text().begin(), range.text().end());
    auto nl = text.find('\n');
    if (nl != std::string::npos) text = text.substr(0, nl) + " ...";
    if (text.size() > 80) text = text.substr(0, 77) + "...";
    if (text.empty()) return "";
    std::string out = " (`" + text + "`";
    if (auto where = range.file_line_col()) {
      out += ", line " + std::to_string(std::get<1>(*where)) + " of " + std::get<0>(*where);
    }
    return out + ")";
  };
  try {
    if (const auto original = n->sourceRange().findSourceRangeThatGenerated()) {
      std::string out = describe(*original);
      if (!out.empty()) return out;
    }
  } catch (const std::exception&) {
  }
  try {
    std::string out = describe(n->sourceRange());
    if (!out.empty()) return out;
  } catch (const std::exception&) {
  }
  return std::string(" (") + n->kind().toQualString() + ")";
}

void Analysis::If(Node* n) {
  for (size_t i = 0; i < n->outputs().size(); ++i) {
    Value* a = n->blocks()[0]->outputs()[i];
    Value* b = n->blocks()[1]->outputs()[i];
    auto absent = [&](Value* v) {
      return v->type()->kind() == c10::TypeKind::NoneType || v->node()->kind() == prim::Uninitialized;
    };
    Space sa = Of(a), sb = Of(b);
    if (skipped_.count(n->blocks()[0]) || absent(a)) {
      Set(n->output(i), sb, CDim(b));
      continue;
    }
    if (skipped_.count(n->blocks()[1]) || absent(b)) {
      Set(n->output(i), sa, CDim(a));
      continue;
    }
    if (sa.empty() && sb.empty()) continue;
    bool same = sa.size() == sb.size() && CDim(a) == CDim(b);
    for (size_t j = 0; same && j < sa.size(); ++j)
      same = sa[j].size == sb[j].size && sa[j].factor == sb[j].factor;
    if (!same) {
      Block(sa, "branches that return different channels");
      Block(sb, "branches that return different channels");
      continue;
    }
    for (size_t j = 0; j < sa.size(); ++j) Union(sa[j].atom, sb[j].atom);
    Set(n->output(i), sa, CDim(a));
  }
}

namespace {

std::vector<Group> Collect(Analysis& analysis) {
  auto& atoms = analysis.atoms();
  std::map<int, Group> by_root;
  for (size_t i = 0; i < atoms.size(); ++i) {
    int r = analysis.Find(static_cast<int>(i));
    auto [it, fresh] = by_root.try_emplace(
        r,
        Group{r, atoms[r].size, atoms[r].granule, atoms[r].multiple, "", atoms[r].blocked, atoms[r].why, {}});
    Group& g = it->second;
    if (g.name.empty()) g.name = atoms[i].name;
    g.members.insert(g.members.end(), atoms[i].members.begin(), atoms[i].members.end());
  }
  std::vector<Group> out;
  for (auto& [r, g] : by_root) {
    bool produces = false;
    for (const auto& m : g.members) produces |= m.role == Role::kOut;
    if (!produces) continue;  // channels of the input or of fixed parts
    if (g.name.empty()) g.name = "(unnamed)";
    out.push_back(std::move(g));
  }
  return out;
}

// Index ranges each group owns along (tensor, dim); two groups claiming one index (shared
// weights) cannot be cut independently, and sizes must match what the graph implies.
void CheckClaims(const torch::jit::Module& root, std::vector<Group>& groups) {
  for (int round = 0; round < 4; ++round) {
    std::map<std::pair<std::string, int64_t>, std::vector<int>> owner;  // per element: group index + 1
    std::set<size_t> bad;
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      Group& g = groups[gi];
      if (g.blocked) continue;
      for (const auto& m : g.members) {
        for (const auto& p : m.params) {
          at::Tensor t = TensorAt(root, p);
          if (!t.defined() || t.dim() <= m.dim) {
            bad.insert(gi);
            continue;
          }
          const int64_t len = t.size(m.dim);
          const int64_t need = m.offset + g.size * m.factor;
          bool exact = m.role == Role::kOut || m.role == Role::kDepthwise;
          if (need > len || (exact && need != len)) {
            bad.insert(gi);
            continue;
          }
          auto& claims = owner[{Join(p), m.dim}];
          claims.resize(static_cast<size_t>(len), 0);
          for (int64_t i = m.offset; i < need; ++i) {
            int& c = claims[static_cast<size_t>(i)];
            if (c != 0 && c != static_cast<int>(gi) + 1) {
              bad.insert(gi);
              bad.insert(static_cast<size_t>(c - 1));
            }
            c = static_cast<int>(gi) + 1;
          }
        }
      }
    }
    if (bad.empty()) return;
    for (size_t gi : bad) {
      groups[gi].blocked = true;
      groups[gi].why = "its parameters are shared with other channels or do not have the expected size";
    }
  }
}

}  // namespace

Prepared Prepare(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
                 const InputShapes& more) {
  Prepared p;
  p.module = module.clone();
  p.module.eval();
  if (!p.module.find_method("forward") ||
      p.module.get_method("forward").graph()->inputs().size() != 2 + more.size()) {
    throw EngineError(Code::kInvalidArgument, "CHANNEL_PRUNE",
                      "prune.channel needs a model whose forward takes " + std::to_string(1 + more.size()) +
                          " tensor(s), one per input shape");
  }
  p.graph = InlineForward(p.module);
  std::vector<int64_t> shape = input_shape;
  shape[0] = 2;  // batch norms in training mode need more than one value per channel
  const c10::Device device = ModuleDevice(p.module);
  at::Generator gen = at::detail::createCPUGenerator(7);
  p.probe = {at::randn(shape, gen).to(device)};
  for (const at::Tensor& t : RandomInputs(more, 2, device, gen)) p.probe.push_back(t);
  std::unordered_map<Value*, Shape> shapes;
  p.train_ok = ProbeShapes(p.module, p.graph, p.probe, true, shapes, p.reference);
  Analysis analysis(p.module, p.graph, std::move(shapes));
  analysis.Run();
  p.groups = Collect(analysis);
  CheckClaims(p.module, p.groups);
  std::map<int, int> group_of_root;
  for (size_t i = 0; i < p.groups.size(); ++i) group_of_root[p.groups[i].root] = static_cast<int>(i);
  for (const auto& c : analysis.size_constants) {
    SizeFixup f{c.node, {}};
    for (const auto& seg : c.space) {
      auto it = group_of_root.find(analysis.Find(seg.atom));
      f.parts.emplace_back(it == group_of_root.end() ? -1 : it->second, seg.size, seg.factor);
    }
    p.fixups.push_back(std::move(f));
  }
  return p;
}

}  // namespace pare::engine::channels
