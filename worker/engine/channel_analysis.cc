#include "worker/engine/channel_internal.h"

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>
#include <tuple>
#include <unordered_map>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"

namespace pare::engine::channels {

bool In(c10::Symbol k, std::initializer_list<c10::Symbol> set) {
  return std::find(set.begin(), set.end(), k) != set.end();
}

namespace {

// ---------------------------------------------------------------------------------------
// The analysis

// A run of channels along dim 1 of a value that all come from one atom (a producer's output
// channels); `factor` elements per channel once flattened ("x.flatten(1)" after a 7x7 pool).
struct Seg {
  int atom;
  int64_t size;
  int64_t factor;
};
using Space = std::vector<Seg>;  // empty: channels nobody may change (model input, unknown ops)

// Whether some channels are flattened into several elements each (after `x.flatten(1)`).
bool Flattened(const Space& s) {
  for (const auto& g : s) {
    if (g.factor != 1) return true;
  }
  return false;
}

int64_t Length(const Space& s) {
  int64_t n = 0;
  for (const auto& g : s) n += g.size * g.factor;
  return n;
}

struct Atom {
  int64_t size;
  int parent;
  int64_t granule = 1;   // channels are removed in whole runs of this many (a grouped conv's groups)
  int64_t multiple = 1;  // the kept count stays a multiple of this (a group norm's groups)
  bool blocked = false;
  std::string why;
  std::string name;
  std::vector<Member> members;
};

class Analysis {
 public:
  Analysis(const torch::jit::Module& root, std::shared_ptr<Graph> graph,
           std::unordered_map<Value*, Shape> shapes)
      : root_(root), graph_(std::move(graph)), shapes_(std::move(shapes)), self_(graph_->inputs()[0]) {}

  void Run() {
    Visit(graph_->block());
    for (Value* v : graph_->outputs()) {
      Block(Of(v), "it reaches the model's output");
      auto d = dicts_.find(v);  // a returned dict: what it holds is the output
      if (d == dicts_.end()) continue;
      for (const auto& [key, held] : d->second) Block(Of(held), "it reaches the model's output");
    }
  }

  std::vector<Atom>& atoms() { return atoms_; }
  int Find(int a) {
    while (atoms_[a].parent != a) a = atoms_[a].parent = atoms_[atoms_[a].parent].parent;
    return a;
  }
  void BlockRoot(int a, const std::string& why) {
    Atom& r = atoms_[Find(a)];
    if (!r.blocked) r.why = why;
    r.blocked = true;
  }

 private:
  int NewAtom(int64_t size, const std::string& name) {
    atoms_.push_back(Atom{size, static_cast<int>(atoms_.size()), 1, 1, false, "", name, {}});
    return atoms_.back().parent;
  }
  void Union(int a, int b) {
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
  void Block(const Space& s, const std::string& why) {
    for (const auto& g : s) BlockRoot(g.atom, why);
  }
  Space Of(Value* v) {
    auto it = space_.find(v);
    return it == space_.end() ? Space{} : it->second;
  }
  // The dimension that holds a value's channels: 1, or the last one after a permute to
  // channels-last (ConvNeXt's blocks run their norm and linear layers that way).
  int64_t CDim(Value* v) {
    auto it = cdim_.find(v);
    return it == cdim_.end() ? 1 : it->second;
  }
  void Set(Value* v, const Space& s, int64_t cdim = 1) {
    space_[v] = s;
    if (cdim != 1) cdim_[v] = cdim;
  }
  // Channels in dim 1, as convolutions, pools and reshapes expect.
  bool ChannelsFirst(Value* v, const Space& s, const std::string& op) {
    if (CDim(v) == 1) return true;
    Block(s, op + " on channels-last values");
    return false;
  }
  const Shape* ShapeOf(Value* v) {
    auto it = shapes_.find(v);
    return it == shapes_.end() ? nullptr : &it->second;
  }
  std::string OpName(Node* n) { return n->kind().toQualString(); }
  void BlockTensorInputs(Node* n, const std::string& why) {
    for (Value* v : n->inputs()) Block(Of(v), why);
  }
  void AddMember(const Space& s, Role role, const std::vector<Path>& params, int64_t dim,
                 Node* conv = nullptr, size_t groups_input = 0) {
    int64_t offset = 0;
    for (const auto& g : s) {
      atoms_[g.atom].members.push_back(Member{role, params, dim, offset, g.factor, conv, groups_input});
      offset += g.size * g.factor;
    }
  }

  // Elementwise combination: every operand with channels must have the same layout; an
  // operand without known channels must broadcast along dim 1.
  void Elementwise(Node* n, const std::vector<Value*>& operands) {
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

  // The constant key of a dict op, as text ("" when it is not a constant string or int).
  static std::string DictKey(Value* key) {
    auto k = torch::jit::toIValue(key);
    if (!k) return "";
    if (k->isString()) return "s:" + k->toStringRef();
    if (k->isInt()) return "i:" + std::to_string(k->toInt());
    return "";
  }

  // A dict whose every use is a `d[key] = v` in the graph's top block or a `d[key]` read, with
  // constant keys, or the graph's return: a read gives the channels of the value last stored.
  void Dict(Node* n) {
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

  void Visit(torch::jit::Block* b) {
    for (Node* n : b->nodes()) VisitNode(n);
  }

  void VisitNode(Node* n) {
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
    // Reads that adapt to any channel count.
    if (In(k, {prim::Constant,
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
               prim::is_cuda})) {
      return;
    }
    if (k == prim::unchecked_cast) {
      Set(n->output(), Of(n->input(0)), CDim(n->input(0)));
      return;
    }
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
    if (In(k, {aten::relu, aten::relu_, aten::relu6, aten::relu6_, aten::hardtanh, aten::hardtanh_,
               aten::sigmoid, aten::sigmoid_, aten::hardsigmoid, aten::hardsigmoid_, aten::hardswish,
               aten::hardswish_, aten::silu, aten::silu_, aten::gelu, aten::elu, aten::elu_, aten::leaky_relu,
               aten::leaky_relu_, aten::tanh, aten::tanh_, aten::mish, aten::softplus, aten::dropout,
               aten::dropout_, aten::feature_dropout, aten::feature_dropout_, aten::alpha_dropout,
               aten::alpha_dropout_, aten::feature_alpha_dropout, aten::contiguous, aten::clone, aten::detach,
               aten::neg, aten::clamp, aten::clamp_, aten::clamp_min, aten::clamp_min_, aten::clamp_max,
               aten::to, aten::add, aten::add_, aten::sub, aten::sub_, aten::mul, aten::mul_, aten::div,
               aten::div_, aten::maximum, aten::minimum, aten::exp, aten::sqrt,
               // Along the channels too: with fewer channels they normalise over the ones kept.
               aten::softmax, aten::log_softmax})) {
      std::vector<Value*> operands;
      for (Value* v : n->inputs()) {
        if (IsTensor(v)) operands.push_back(v);
      }
      if (n->outputs().size() != 1 || !IsTensor(n->output())) return BlockTensorInputs(n, OpName(n));
      return Elementwise(n, operands);
    }
    if (In(k, {aten::max_pool1d,
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
               aten::upsample_trilinear3d})) {
      Space s = Of(n->input(0));
      if (!ChannelsFirst(n->input(0), s, OpName(n))) return;
      for (const auto& g : s) {
        if (g.factor != 1) return Block(s, OpName(n) + " on flattened channels");
      }
      // Pools that also return indices: those have the same channels.
      for (Value* out : n->outputs()) {
        if (IsTensor(out)) space_[out] = s;
      }
      return;
    }
    if (In(k, {aten::mean, aten::sum, aten::amax})) return Reduce(n);
    if (In(k, {aten::flatten, aten::view, aten::reshape, aten::squeeze, aten::unsqueeze})) return Reshape(n);
    const bool dict_op = (k == aten::_set_item || k == aten::__getitem__) && dicts_.count(n->input(0));
    if (k == prim::DictConstruct || (k == aten::dict && n->inputs().empty()) || dict_op) return Dict(n);
    if (k == prim::ListConstruct) {
      if (Returned(n->output())) return BlockTensorInputs(n, "it reaches the model's output");
      for (const auto& use : n->output()->uses()) {
        if (!(use.user->kind() == aten::cat && use.offset == 0)) {
          return BlockTensorInputs(n, "a list of tensors" + Code(use.user));
        }
      }
      return;
    }
    if (k == aten::cat) return Cat(n);
    if (k == prim::If) return If(n);
    if (k == prim::Loop) {
      BlockTensorInputs(n, "a loop" + Code(n));
      for (Value* v : n->blocks()[0]->outputs()) Block(Of(v), "a loop" + Code(n));
      return;
    }
    BlockTensorInputs(n, OpName(n) + Code(n));
  }

  // Whether a condition depends only on constants and the ranks and sizes of tensors.
  bool ShapeDerived(Value* v, int depth) {
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
  // Whether a block makes tensors and none of them was seen by the probe.
  bool NeverRan(torch::jit::Block* b) {
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
  bool Returned(Value* v) {
    for (const auto& use : v->uses()) {
      if (use.user == graph_->return_node()) return true;
    }
    return false;
  }
  // " (`torch.chunk(x, 2, 1)`, line 12 of code/__torch__/model.py)": where the op is in the
  // model's code, for the report.
  static std::string Code(Node* n) {
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

  void Conv(Node* n) {
    const bool long_form = n->kind() == aten::_convolution;
    const size_t groups_at = long_form ? 8 : 6;
    Value* x = n->input(0);
    Space in = Of(x);
    if (!ChannelsFirst(x, in, "a convolution")) return;
    Source w = Resolve(root_, n->input(1), self_);
    Source b = Resolve(root_, n->input(2), self_);
    auto groups = torch::jit::toIValue(n->input(groups_at));
    if (long_form) {
      auto t = torch::jit::toIValue(n->input(6));
      if (!t || !t->isBool()) return Block(in, "a convolution that may be transposed" + Code(n));
      if (t->toBool()) return ConvTranspose(n, 8);
    }
    at::Tensor weight = w.kind == Source::kAttr ? TensorAt(root_, w.path) : at::Tensor();
    if (!weight.defined() || !groups || !groups->isInt() || b.kind == Source::kOther) {
      return Block(in, "a convolution whose weight, bias or groups is not a plain attribute");
    }
    const int64_t g = groups->toInt();
    const int64_t out = weight.size(0);
    const int64_t in_channels = weight.size(1) * g;
    Path layer(w.path.begin(), w.path.end() - 1);
    std::vector<Path> params{w.path};
    if (b.kind == Source::kAttr) params.push_back(b.path);
    for (const auto& s : in) {
      if (s.factor != 1) return Block(in, "a convolution over flattened channels");
    }
    if (!in.empty() && Length(in) != in_channels)
      return Block(in, "a convolution whose input does not match");
    if (g == 1) {
      AddMember(in, Role::kIn, {w.path}, 1);
      int a = NewAtom(out, Join(layer));
      atoms_[a].members.push_back(Member{Role::kOut, params, 0, 0, 1});
      space_[n->output()] = {Seg{a, out, 1}};
      return;
    }
    if (out == in_channels && in.size() == 1) {
      // Depthwise (and grouped with as many outputs as inputs): channel i in, channel i out;
      // whole groups go, and `groups` follows the kept count.
      const int64_t per_group = in_channels / g;
      Member m{Role::kDepthwise, params, 0, 0, 1, n, groups_at, per_group};
      int root = Find(in[0].atom);
      atoms_[in[0].atom].members.push_back(m);
      atoms_[root].granule = std::lcm(atoms_[root].granule, per_group);
      space_[n->output()] = in;
      return;
    }
    Block(in, "a grouped convolution (" + Join(layer) + ", groups=" + std::to_string(g) + ")");
  }

  // A transposed convolution: weight [in, out / groups, k...], so its input channels are dim 0
  // and its output channels dim 1 of the weight.
  void ConvTranspose(Node* n, size_t groups_at) {
    Value* x = n->input(0);
    Space in = Of(x);
    if (!ChannelsFirst(x, in, "a transposed convolution")) return;
    Source w = Resolve(root_, n->input(1), self_);
    Source b = Resolve(root_, n->input(2), self_);
    auto groups = torch::jit::toIValue(n->input(groups_at));
    at::Tensor weight = w.kind == Source::kAttr ? TensorAt(root_, w.path) : at::Tensor();
    if (!weight.defined() || !groups || !groups->isInt() || b.kind == Source::kOther) {
      return Block(in, "a transposed convolution whose weight, bias or groups is not a plain attribute");
    }
    Path layer(w.path.begin(), w.path.end() - 1);
    if (groups->toInt() != 1) {
      return Block(in, "a grouped transposed convolution (" + Join(layer) + ")");
    }
    if (Flattened(in) || (!in.empty() && Length(in) != weight.size(0))) {
      return Block(in, "a transposed convolution whose input does not match");
    }
    AddMember(in, Role::kIn, {w.path}, 0);
    const int64_t out = weight.size(1);
    int a = NewAtom(out, Join(layer));
    atoms_[a].members.push_back(Member{Role::kOut, {w.path}, 1, 0, 1});
    if (b.kind == Source::kAttr) atoms_[a].members.push_back(Member{Role::kChannelParam, {b.path}, 0, 0, 1});
    space_[n->output()] = {Seg{a, out, 1}};
  }

  // group_norm: weight and bias cut with the channels, and the kept count stays a multiple
  // of its (unchanged) number of groups.
  void GroupNorm(Node* n) {
    Space in = Of(n->input(0));
    if (in.empty() || !ChannelsFirst(n->input(0), in, "a group norm")) return;
    auto groups = torch::jit::toIValue(n->input(1));
    Source w = Resolve(root_, n->input(2), self_);
    Source b = Resolve(root_, n->input(3), self_);
    if (!groups || !groups->isInt() || groups->toInt() < 1)
      return Block(in, "a group norm with a variable group count");
    if (w.kind == Source::kOther || b.kind == Source::kOther) {
      return Block(in, "a group norm whose parameters are not plain attributes");
    }
    if (Flattened(in)) return Block(in, "a group norm over flattened channels");
    if (in.size() != 1) return Block(in, "a group norm over the channels of several producers");
    std::vector<Path> params;
    for (const Source* src : {&w, &b}) {
      if (src->kind == Source::kAttr) params.push_back(src->path);
    }
    AddMember(in, Role::kNorm, params, 0);
    Atom& root = atoms_[Find(in[0].atom)];
    root.multiple = std::lcm(root.multiple, groups->toInt());
    if (root.size % std::lcm(root.granule, root.multiple) != 0) {
      BlockRoot(in[0].atom, "group norms and grouped convolutions whose group sizes do not fit together");
    }
    space_[n->output()] = in;
  }

  void Linear(Node* n) {
    Space in = Of(n->input(0));
    Source w = Resolve(root_, n->input(1), self_);
    Source b = Resolve(root_, n->input(2), self_);
    at::Tensor weight = w.kind == Source::kAttr ? TensorAt(root_, w.path) : at::Tensor();
    const Shape* shape = ShapeOf(n->input(0));
    const Shape* out_shape = ShapeOf(n->output());
    if (!weight.defined() || b.kind == Source::kOther || weight.dim() != 2 || !out_shape) {
      return Block(in, "a linear layer whose weight or bias is not a plain attribute");
    }
    if (!in.empty()) {
      // Over [N, C] (possibly flattened channels), or over channels-last [N, ..., C].
      const int64_t rank = shape ? static_cast<int64_t>(shape->size()) : 0;
      const bool ok = shape && Length(in) == weight.size(1) &&
                      (rank == 2 || (CDim(n->input(0)) == rank - 1 && !Flattened(in)));
      if (!ok) return Block(in, "a linear layer over more than two dimensions");
    }
    AddMember(in, Role::kIn, {w.path}, 1);
    std::vector<Path> params{w.path};
    if (b.kind == Source::kAttr) params.push_back(b.path);
    int a = NewAtom(weight.size(0), Join(Path(w.path.begin(), w.path.end() - 1)));
    atoms_[a].members.push_back(Member{Role::kOut, params, 0, 0, 1});
    Set(n->output(), {Seg{a, weight.size(0), 1}}, static_cast<int64_t>(out_shape->size()) - 1);
  }

  // permute that moves the channels to the last dimension or back to dim 1.
  void Permute(Node* n) {
    Space in = Of(n->input(0));
    if (in.empty()) return;
    auto dims = torch::jit::toIValue(n->input(1));
    const Shape* shape = ShapeOf(n->input(0));
    if (Flattened(in)) return Block(in, "aten::permute of flattened channels");
    if (!dims || !dims->isIntList() || !shape)
      return Block(in, "aten::permute with dimensions only known at run time");
    const int64_t rank = static_cast<int64_t>(shape->size());
    std::vector<int64_t> order = dims->toIntVector();
    for (size_t j = 0; j < order.size(); ++j) {
      int64_t d = order[j] < 0 ? order[j] + rank : order[j];
      if (d != CDim(n->input(0))) continue;
      const int64_t to = static_cast<int64_t>(j);
      if (order[0] % rank != 0 || (to != 1 && to != rank - 1)) break;
      Set(n->output(), in, to);
      return;
    }
    Block(in, "aten::permute that moves the channel dimension");
  }

  // layer_norm over the channels alone, channels last (ConvNeXt): its weight and bias are cut
  // with them and `normalized_shape` follows the kept count.
  void LayerNorm(Node* n) {
    Space in = Of(n->input(0));
    if (in.empty()) return;
    const Shape* shape = ShapeOf(n->input(0));
    Source w = Resolve(root_, n->input(2), self_);
    Source b = Resolve(root_, n->input(3), self_);
    at::Tensor weight = w.kind == Source::kAttr ? TensorAt(root_, w.path) : at::Tensor();
    if (in.size() != 1) return Block(in, "a layer_norm over channels of several producers");
    if (!shape || Flattened(in) || CDim(n->input(0)) != static_cast<int64_t>(shape->size()) - 1 ||
        !weight.defined() || weight.dim() != 1 || weight.size(0) != Length(in) || b.kind == Source::kOther) {
      return Block(in, "a layer_norm that is not over the channels alone");
    }
    std::vector<Path> params{w.path};
    if (b.kind == Source::kAttr) params.push_back(b.path);
    AddMember(in, Role::kLayerNorm, params, 0, n, /*normalized_shape*/ 1);
    Set(n->output(), in, CDim(n->input(0)));
  }

  // batch_norm and instance_norm: their weight, bias, running mean and variance (inputs 1-4,
  // each optional) are cut with the channels.
  void Norm(Node* n, const std::string& what) {
    Space in = Of(n->input(0));
    if (in.empty() || !ChannelsFirst(n->input(0), in, what)) return;
    std::vector<Path> params;
    for (size_t i : {1, 2, 3, 4}) {
      Source s = Resolve(root_, n->input(i), self_);
      if (s.kind == Source::kOther) return Block(in, what + " whose parameters are not plain attributes");
      if (s.kind == Source::kAttr) params.push_back(s.path);
    }
    if (Flattened(in)) return Block(in, what + " over flattened channels");
    if (!params.empty()) AddMember(in, Role::kNorm, params, 0);
    space_[n->output()] = in;
  }

  void PRelu(Node* n) {
    Space in = Of(n->input(0));
    Source w = Resolve(root_, n->input(1), self_);
    if (in.empty() || !ChannelsFirst(n->input(0), in, "a PReLU")) return;
    at::Tensor weight = w.kind == Source::kAttr ? TensorAt(root_, w.path) : at::Tensor();
    if (!weight.defined()) return Block(in, "a PReLU whose weight is not an attribute");
    if (weight.numel() != 1) AddMember(in, Role::kChannelParam, {w.path}, 0);
    space_[n->output()] = in;
  }

  void Reduce(Node* n) {
    Space in = Of(n->input(0));
    if (in.empty() || !ChannelsFirst(n->input(0), in, OpName(n))) return;
    const Shape* shape = ShapeOf(n->input(0));
    // Over every dimension (`x.mean()` in a condition): a scalar, whatever the channel count.
    if (n->inputs().size() == 1 ||
        (n->inputs().size() == 2 && n->input(1)->type()->kind() != c10::TypeKind::ListType)) {
      return;
    }
    auto dims = torch::jit::toIValue(n->input(1));
    if (!shape || !dims || !dims->isIntList())
      return Block(in, OpName(n) + " over dimensions known only at run time");
    if (dims->toIntVector().empty()) return;  // amax(x): over every dimension
    const int64_t rank = static_cast<int64_t>(shape->size());
    for (int64_t d : dims->toIntVector()) {
      if (d < 0) d += rank;
      if (d <= 1) return Block(in, OpName(n) + " over the channel dimension");
    }
    for (const auto& g : in) {
      if (g.factor != 1) return Block(in, OpName(n) + " on flattened channels");
    }
    space_[n->output()] = in;
  }

  // flatten / view / reshape / squeeze / unsqueeze that keep batch and channels in dims 0 and
  // 1: either the trailing size is unchanged, or the trailing dims fold into the channels.
  void Reshape(Node* n) {
    Space in = Of(n->input(0));
    if (in.empty() || !ChannelsFirst(n->input(0), in, OpName(n))) return;
    const Shape* a = ShapeOf(n->input(0));
    const Shape* b = ShapeOf(n->output());
    if (!a || !b || a->size() < 2 || b->size() < 2 || (*a)[0] != (*b)[0]) {
      return Block(in, OpName(n) + " that moves the channel dimension");
    }
    auto tail = [](const Shape& s) {
      int64_t p = 1;
      for (size_t i = 2; i < s.size(); ++i) p *= s[i];
      return p;
    };
    if ((*a)[1] == (*b)[1] && tail(*a) == tail(*b)) {
      space_[n->output()] = in;
      SizeInList(n, in, (*b)[1]);
      return;
    }
    if (b->size() == 2 && (*b)[1] == (*a)[1] * tail(*a)) {
      Space out = in;
      for (auto& g : out) g.factor *= tail(*a);
      space_[n->output()] = out;
      SizeInList(n, out, (*b)[1]);
      return;
    }
    Block(in, OpName(n) + " that moves the channel dimension");
  }

  // A view/reshape whose size list gives dim 1 as the constant `extent`: remember it.
  void SizeInList(Node* n, const Space& out, int64_t extent) {
    if (n->kind() != aten::view && n->kind() != aten::reshape) return;
    Value* size = n->input(1);
    c10::optional<c10::IValue> element;
    if (size->node()->kind() == prim::ListConstruct && size->node()->inputs().size() >= 2) {
      element = torch::jit::toIValue(size->node()->input(1));
    } else if (auto whole = torch::jit::toIValue(size);
               whole && whole->isIntList() && whole->toIntVector().size() >= 2) {
      element = whole->toIntVector()[1];
    }
    if (element && element->isInt() && element->toInt() == extent) size_constants.push_back({n, out});
  }

  void Cat(Node* n) {
    Node* list = n->input(0)->node();
    auto dim = torch::jit::toIValue(n->input(1));
    const Shape* out_shape = ShapeOf(n->output());
    if (list->kind() != prim::ListConstruct || !dim || !dim->isInt() || !out_shape) {
      if (list->kind() == prim::ListConstruct) BlockTensorInputs(list, "a concatenation");
      return;
    }
    for (Value* v : list->inputs()) {
      if (!Of(v).empty() && CDim(v) != 1)
        return BlockTensorInputs(list, "a concatenation of channels-last values");
    }
    int64_t d = dim->toInt();
    if (d < 0) d += static_cast<int64_t>(out_shape->size());
    if (d != 1) {
      // Along another dimension the channels of every part line up.
      return Elementwise(n, std::vector<Value*>(list->inputs().begin(), list->inputs().end()));
    }
    Space out;
    bool any = false;
    for (Value* v : list->inputs()) {
      Space s = Of(v);
      const Shape* sh = ShapeOf(v);
      if (s.empty()) {
        if (!sh || sh->size() < 2)
          return BlockTensorInputs(list, "a concatenation with parts of unknown size");
        int a = NewAtom((*sh)[1], "");
        BlockRoot(a, "fixed channels");
        s = {Seg{a, (*sh)[1], 1}};
      } else {
        any = true;
      }
      for (const auto& g : s) {
        if (g.factor != 1) return BlockTensorInputs(list, "a concatenation of flattened channels");
      }
      out.insert(out.end(), s.begin(), s.end());
    }
    if (any) space_[n->output()] = out;
  }

  void If(Node* n) {
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

  const torch::jit::Module& root_;
  std::shared_ptr<Graph> graph_;
  std::unordered_map<Value*, Shape> shapes_;
  Value* self_;
  std::vector<Atom> atoms_;
  std::unordered_map<Value*, Space> space_;
  // Dicts built by the graph (torchvision's IntermediateLayerGetter, segmentation outputs) and
  // only filled and read with constant keys: the value each key holds so far.
  std::unordered_map<Value*, std::map<std::string, Value*>> dicts_;
  std::unordered_map<Value*, int64_t> cdim_;
  std::set<torch::jit::Block*> skipped_;  // branches on shapes that never ran on the probe
 public:
  // view/reshape whose size list holds the channel count (times the flattened spatial size)
  // as a constant, `x.view(-1, 320)`: that constant follows the kept channels.
  struct SizeConstant {
    Node* node;
    Space space;
  };
  std::vector<SizeConstant> size_constants;
};

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
