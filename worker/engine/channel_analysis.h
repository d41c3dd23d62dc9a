// Channel pruning's dependency analysis (internal): which channels of which values must be cut
// together. Every producer's output channels start as an atom; ops that tie channels together
// (elementwise adds, norms, concatenations) unite atoms; ops Pare cannot follow block them. The
// groups are the united atoms that some layer produces. Core walk in channel_analysis.cc, the
// rules of each op family in channel_ops.cc.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "worker/engine/channel_internal.h"

namespace pare::engine::channels {

// A run of channels along dim 1 of a value that all come from one atom (a producer's output
// channels); `factor` elements per channel once flattened ("x.flatten(1)" after a 7x7 pool).
struct Seg {
  int atom;
  int64_t size;
  int64_t factor;
};
using Space = std::vector<Seg>;  // empty: channels nobody may change (model input, unknown ops)

// Whether some channels are flattened into several elements each (after `x.flatten(1)`).
inline bool Flattened(const Space& s) {
  for (const auto& g : s) {
    if (g.factor != 1) return true;
  }
  return false;
}

inline int64_t Length(const Space& s) {
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

  void Run();

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
  void Union(int a, int b);
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
  void Elementwise(Node* n, const std::vector<Value*>& operands);

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
  void Dict(Node* n);

  void Visit(torch::jit::Block* b) {
    for (Node* n : b->nodes()) VisitNode(n);
  }

  void VisitNode(Node* n);
  void List(Node* n);
  // An op applied channel by channel, or elementwise between its tensor operands.
  void Pointwise(Node* n);
  // Pools and resampling: the same channels, other spatial sizes.
  void Spatial(Node* n);

  // Whether a condition depends only on constants and the ranks and sizes of tensors.
  bool ShapeDerived(Value* v, int depth);
  // Whether a block makes tensors and none of them was seen by the probe.
  bool NeverRan(torch::jit::Block* b);
  bool Returned(Value* v) {
    for (const auto& use : v->uses()) {
      if (use.user == graph_->return_node()) return true;
    }
    return false;
  }
  // " (`torch.chunk(x, 2, 1)`, line 12 of code/__torch__/model.py)": where the op is in the
  // model's code, for the report.
  static std::string Code(Node* n);

  void Conv(Node* n);

  // A transposed convolution: weight [in, out / groups, k...], so its input channels are dim 0
  // and its output channels dim 1 of the weight.
  void ConvTranspose(Node* n, size_t groups_at);

  // group_norm: weight and bias cut with the channels, and the kept count stays a multiple
  // of its (unchanged) number of groups.
  void GroupNorm(Node* n);

  void Linear(Node* n);

  // permute that moves the channels to the last dimension or back to dim 1.
  void Permute(Node* n);

  // layer_norm over the channels alone, channels last (ConvNeXt): its weight and bias are cut
  // with them and `normalized_shape` follows the kept count.
  void LayerNorm(Node* n);

  // batch_norm and instance_norm: their weight, bias, running mean and variance (inputs 1-4,
  // each optional) are cut with the channels.
  void Norm(Node* n, const std::string& what);

  void PRelu(Node* n);

  void Reduce(Node* n);

  // flatten / view / reshape / squeeze / unsqueeze that keep batch and channels in dims 0 and
  // 1: either the trailing size is unchanged, or the trailing dims fold into the channels.
  void Reshape(Node* n);

  // A view/reshape whose size list gives dim 1 as the constant `extent`: remember it.
  void SizeInList(Node* n, const Space& out, int64_t extent);

  void Cat(Node* n);

  void If(Node* n);

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

}  // namespace pare::engine::channels
