// The rules of each op family for channel pruning's analysis: which parameters a layer's
// channels own, and how an op passes channels on (or blocks them).
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

void Analysis::Conv(Node* n) {
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
  if (!in.empty() && Length(in) != in_channels) return Block(in, "a convolution whose input does not match");
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

void Analysis::ConvTranspose(Node* n, size_t groups_at) {
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

void Analysis::GroupNorm(Node* n) {
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

void Analysis::Linear(Node* n) {
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

void Analysis::Permute(Node* n) {
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

void Analysis::LayerNorm(Node* n) {
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

void Analysis::Norm(Node* n, const std::string& what) {
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

void Analysis::PRelu(Node* n) {
  Space in = Of(n->input(0));
  Source w = Resolve(root_, n->input(1), self_);
  if (in.empty() || !ChannelsFirst(n->input(0), in, "a PReLU")) return;
  at::Tensor weight = w.kind == Source::kAttr ? TensorAt(root_, w.path) : at::Tensor();
  if (!weight.defined()) return Block(in, "a PReLU whose weight is not an attribute");
  if (weight.numel() != 1) AddMember(in, Role::kChannelParam, {w.path}, 0);
  space_[n->output()] = in;
}

void Analysis::Reduce(Node* n) {
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

void Analysis::Reshape(Node* n) {
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

void Analysis::SizeInList(Node* n, const Space& out, int64_t extent) {
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

void Analysis::Cat(Node* n) {
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
      if (!sh || sh->size() < 2) return BlockTensorInputs(list, "a concatenation with parts of unknown size");
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

void Analysis::Pointwise(Node* n) {
  std::vector<Value*> operands;
  for (Value* v : n->inputs()) {
    if (IsTensor(v)) operands.push_back(v);
  }
  if (n->outputs().size() != 1 || !IsTensor(n->output())) return BlockTensorInputs(n, OpName(n));
  Elementwise(n, operands);
}

void Analysis::Spatial(Node* n) {
  Space s = Of(n->input(0));
  if (!ChannelsFirst(n->input(0), s, OpName(n))) return;
  for (const auto& g : s) {
    if (g.factor != 1) return Block(s, OpName(n) + " on flattened channels");
  }
  // Pools that also return indices: those have the same channels.
  for (Value* out : n->outputs()) {
    if (IsTensor(out)) space_[out] = s;
  }
}

}  // namespace pare::engine::channels
