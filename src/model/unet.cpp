#include "tilt/model/unet.h"
#include "tilt/model/condition.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <optional>
#include <type_traits>

namespace tilt {

// The architecture (E124) as a list of layers named as in model files, computed from the options alone:
// the constructor allocates from it, the forward pass walks it, and a model file is checked against it.
namespace {

struct Conv {
  std::string name;
  int64_t in = 0, out = 0, kernel = 3, stride = 1;
};
struct Linear {
  std::string name;
  int64_t in = 0, out = 0;
};
struct Norm {
  std::string name;
  int64_t channels = 0;
};
// GroupNorm, SiLU, conv; plus the embedding's shift; GroupNorm, SiLU, conv; plus the input (through a
// 1x1 convolution when the channels change).
struct ResBlock {
  Norm norm1;
  Conv conv1;
  Linear emb;
  Norm norm2;
  Conv conv2;
  std::optional<Conv> skip;
};
struct Attention {
  Norm norm;
  Conv qkv, proj;
};
struct Level {
  std::vector<ResBlock> down, up;
  std::optional<Conv> downsample, upsample;
};
struct Architecture {
  Linear time1, time2;
  std::optional<Linear> condition;
  Conv input;
  std::vector<Level> levels;
  ResBlock mid1, mid2;
  std::optional<Attention> attention;
  Norm out_norm;
  Conv output;
};

ResBlock res_block(const std::string& name, int64_t in, int64_t out, int64_t emb) {
  ResBlock b{{name + ".norm1", in}, {name + ".conv1", in, out}, {name + ".emb", emb, out},
             {name + ".norm2", out}, {name + ".conv2", out, out}, std::nullopt};
  if (in != out) b.skip = Conv{name + ".skip", in, out, 1, 1};
  return b;
}

int64_t embedding_width(const UNetOptions& o) { return 4 * o.base_channels; }

Architecture architecture(const UNetOptions& o) {
  Architecture a;
  const int64_t E = embedding_width(o);
  a.time1 = {"time.0", o.time_features, E};
  a.time2 = {"time.1", E, E};
  if (o.condition_dim > 0) a.condition = Linear{"condition", o.condition_dim + 1, E};
  a.input = {"input", o.channels, o.base_channels};
  std::vector<int64_t> skips;  // the channels of each skip connection, in the order they are made
  int64_t ch = o.base_channels;
  const size_t L = o.channel_mult.size();
  a.levels.resize(L);
  for (size_t l = 0; l < L; ++l) {
    const int64_t out = o.base_channels * o.channel_mult[l];
    for (int64_t b = 0; b < o.blocks; ++b) {
      a.levels[l].down.push_back(res_block("down." + std::to_string(l) + "." + std::to_string(b), ch, out, E));
      ch = out;
      skips.push_back(ch);
    }
    if (l + 1 < L) a.levels[l].downsample = Conv{"down." + std::to_string(l) + ".downsample", ch, ch, 3, 2};
  }
  a.mid1 = res_block("mid.0", ch, ch, E);
  if (o.attention) {
    a.attention = Attention{{"mid.attention.norm", ch}, {"mid.attention.qkv", ch, 3 * ch, 1, 1},
                            {"mid.attention.proj", ch, ch, 1, 1}};
  }
  a.mid2 = res_block("mid.1", ch, ch, E);
  for (size_t l = L; l-- > 0;) {
    const int64_t out = o.base_channels * o.channel_mult[l];
    for (int64_t b = 0; b < o.blocks; ++b) {
      const int64_t skip = skips.back();
      skips.pop_back();
      a.levels[l].up.push_back(res_block("up." + std::to_string(l) + "." + std::to_string(b), ch + skip, out, E));
      ch = out;
    }
    if (l > 0) a.levels[l].upsample = Conv{"up." + std::to_string(l) + ".upsample", ch, ch, 3, 1};
  }
  a.out_norm = {"output.norm", ch};
  a.output = {"output.conv", ch, o.channels};
  return a;
}

using Shapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

// Calls f(layer) for every layer in named_parameters()'s order.
template <class F>
void for_each_layer(const Architecture& a, F&& f) {
  auto block = [&](const ResBlock& b) {
    f(b.norm1);
    f(b.conv1);
    f(b.emb);
    f(b.norm2);
    f(b.conv2);
    if (b.skip) f(*b.skip);
  };
  f(a.time1);
  f(a.time2);
  if (a.condition) f(*a.condition);
  f(a.input);
  for (const Level& l : a.levels) {
    for (const ResBlock& b : l.down) block(b);
    if (l.downsample) f(*l.downsample);
  }
  block(a.mid1);
  if (a.attention) {
    f(a.attention->norm);
    f(a.attention->qkv);
    f(a.attention->proj);
  }
  block(a.mid2);
  for (size_t l = a.levels.size(); l-- > 0;) {
    for (const ResBlock& b : a.levels[l].up) block(b);
    if (a.levels[l].upsample) f(*a.levels[l].upsample);
  }
  f(a.out_norm);
  f(a.output);
}

std::vector<int64_t> weight_shape(const Conv& c) { return {c.out, c.in, c.kernel, c.kernel}; }
std::vector<int64_t> weight_shape(const Linear& l) { return {l.out, l.in}; }
std::vector<int64_t> weight_shape(const Norm& n) { return {n.channels}; }
int64_t bias_size(const Conv& c) { return c.out; }
int64_t bias_size(const Linear& l) { return l.out; }
int64_t bias_size(const Norm& n) { return n.channels; }
int64_t fan_in(const Conv& c) { return c.in * c.kernel * c.kernel; }
int64_t fan_in(const Linear& l) { return l.in; }

constexpr int64_t kMaxChannels = 4096;
constexpr int64_t kMaxPixels = 1 << 20;

}  // namespace

std::optional<std::pair<std::string, std::string>> UNetOptions::problem() const {
  using Problem = std::optional<std::pair<std::string, std::string>>;
  if (channels < 1 || channels > 64) return Problem({"channels", "channels must be in 1..64, got " + std::to_string(channels)});
  if (height < 1 || width < 1 || height * width > kMaxPixels) {
    return Problem({"height", "height and width must be >= 1 with height * width <= " + std::to_string(kMaxPixels) +
                                  ", got " + std::to_string(height) + " x " + std::to_string(width)});
  }
  if (base_channels < 1 || base_channels > kMaxChannels) {
    return Problem({"base_channels", "base_channels must be in 1.." + std::to_string(kMaxChannels) + ", got " +
                                         std::to_string(base_channels)});
  }
  if (channel_mult.empty() || channel_mult.size() > 8) return Problem({"channel_mult", "channel_mult needs 1..8 levels"});
  for (int64_t m : channel_mult) {
    if (m < 1 || base_channels * m > kMaxChannels) {
      return Problem({"channel_mult", "channel_mult entries must be >= 1 with base_channels * mult <= " +
                                          std::to_string(kMaxChannels) + ", got " + std::to_string(m)});
    }
  }
  if (blocks < 1 || blocks > 8) return Problem({"blocks", "blocks must be in 1..8, got " + std::to_string(blocks)});
  if (groups < 1) return Problem({"groups", "groups must be >= 1, got " + std::to_string(groups)});
  for (int64_t m : channel_mult) {
    if ((base_channels * m) % groups != 0) {
      return Problem({"groups", "groups = " + std::to_string(groups) +
                                    " must divide every level's channels (base_channels * mult = " +
                                    std::to_string(base_channels * m) + ")"});
    }
  }
  const int64_t factor = int64_t{1} << (channel_mult.size() - 1);
  if (height % factor != 0 || width % factor != 0) {
    return Problem({"height", "height and width (" + std::to_string(height) + " x " + std::to_string(width) +
                                  ") must be divisible by " + std::to_string(factor) + " = 2^(levels - 1), for " +
                                  std::to_string(channel_mult.size()) + " levels"});
  }
  if (time_features < 2 || time_features % 2 != 0 || time_features > 4096) {
    return Problem({"time_features", "time_features must be an even number in 2..4096, got " + std::to_string(time_features)});
  }
  if (condition_dim < 0) return Problem({"condition_dim", "condition_dim must be >= 0, got " + std::to_string(condition_dim)});
  return std::nullopt;
}

void UNetOptions::validate() const {
  if (const auto p = problem()) throw Error("unet: " + p->second);
}

void LoraOptions::validate() const {
  if (rank < 1 || rank > 4096) throw Error("lora: rank must be in 1..4096, got " + std::to_string(rank));
  if (!(std::isfinite(alpha) && alpha > 0)) throw Error("lora: alpha must be a positive number, got " + std::to_string(alpha));
}

struct UNetVelocity::Impl {
  Architecture arch;
  std::map<std::string, Tensor> weights;  // "<layer>.weight", "<layer>.bias"
  std::vector<std::string> order;         // named_parameters()'s order of the network's tensors
  std::map<std::string, std::pair<Tensor, Tensor>> adapters;  // layer -> (A, B), empty without LoRA
  std::vector<std::string> adapter_order;
  double lora_scale = 0.0;

  const Tensor& at(const std::string& name) const { return weights.at(name); }

  // The weight a layer computes with: W, or W + (alpha / r) B A reshaped to W's shape (E125).
  template <class Layer>
  Tensor weight(const Layer& layer) const {
    const Tensor& w = at(layer.name + ".weight");
    const auto it = adapters.find(layer.name);
    if (it == adapters.end()) return w;
    return w + (lora_scale * at::matmul(it->second.second, it->second.first)).view(w.sizes());
  }
  Tensor conv(const Conv& c, const Tensor& x) const {
    return at::conv2d(x, weight(c), at(c.name + ".bias"), {c.stride, c.stride}, {c.kernel / 2, c.kernel / 2});
  }
  Tensor linear(const Linear& l, const Tensor& x) const { return at::linear(x, weight(l), at(l.name + ".bias")); }
  // In the weights' dtype: under bfloat16 autocast (TrainerOptions::precision) a convolution's output is bfloat16,
  // and GroupNorm runs in float32, as CUDA's autocast casts it (LibTorch 1.13's CPU kernel takes no mixed dtypes).
  Tensor norm(const Norm& n, const Tensor& x, int64_t groups) const {
    const Tensor& w = at(n.name + ".weight");
    return at::group_norm(x.to(w.scalar_type()), groups, w, at(n.name + ".bias"), 1e-5);
  }
  Tensor block(const ResBlock& b, const Tensor& x, const Tensor& emb, int64_t groups) const {
    Tensor h = conv(b.conv1, at::silu(norm(b.norm1, x, groups)));
    h = h + linear(b.emb, emb).unsqueeze(-1).unsqueeze(-1);
    h = conv(b.conv2, at::silu(norm(b.norm2, h, groups)));
    return h + (b.skip ? conv(*b.skip, x) : x);
  }
  // Single-head self-attention over the H W positions, with a residual connection.
  Tensor attention(const Attention& a, const Tensor& x, int64_t groups) const {
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const Tensor qkv = conv(a.qkv, norm(a.norm, x, groups)).view({B, 3, C, H * W});
    const Tensor q = qkv.select(1, 0), k = qkv.select(1, 1), v = qkv.select(1, 2);
    const Tensor scores = at::softmax(at::matmul(q.transpose(1, 2), k) / std::sqrt(static_cast<double>(C)), -1);
    const Tensor out = at::matmul(v, scores.transpose(1, 2)).view({B, C, H, W});  // out_i = sum_j p_ij v_j
    return x + conv(a.proj, out);
  }
};

namespace {

// sin and cos of t w_k, with frequencies w_k = 1000^(1 - k / (n/2)) for k = 0..n/2-1, from 1000 down to
// ~1 per unit of t (E124): [B, n].
Tensor embed_time(const Tensor& t, int64_t batch, int64_t n, const at::TensorOptions& opts) {
  const int64_t half = n / 2;
  const Tensor k = at::arange(half, opts);
  const Tensor freq = at::exp(std::log(1000.0) * (1.0 - k / static_cast<double>(half)));
  const Tensor arg = t.to(opts.dtype()).reshape({-1, 1}).expand({batch, 1}) * freq.unsqueeze(0);
  return at::cat({at::sin(arg), at::cos(arg)}, 1);
}

}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> UNetVelocity::parameter_shapes(
    const UNetOptions& o, const std::optional<LoraOptions>& lora) {
  o.validate();
  if (lora) lora->validate();
  Shapes shapes, adapters;
  for_each_layer(architecture(o), [&](const auto& layer) {
    shapes.push_back({layer.name + ".weight", weight_shape(layer)});
    shapes.push_back({layer.name + ".bias", {bias_size(layer)}});
    using L = std::decay_t<decltype(layer)>;
    if constexpr (!std::is_same_v<L, Norm>) {
      if (lora) {
        adapters.push_back({layer.name + ".lora_a", {lora->rank, fan_in(layer)}});
        adapters.push_back({layer.name + ".lora_b", {weight_shape(layer)[0], lora->rank}});
      }
    }
  });
  shapes.insert(shapes.end(), adapters.begin(), adapters.end());
  return shapes;
}

UNetVelocity::UNetVelocity(const UNetOptions& options, SchedulePtr schedule, uint64_t seed)
    : VelocityField(std::move(schedule)), options_(options), impl_(std::make_unique<Impl>()) {
  options_.validate();
  impl_->arch = architecture(options_);
  Generator gen = make_generator(seed);
  at::NoGradGuard no_grad;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto add = [&](const std::string& name, Tensor value) {
    impl_->weights[name] = value;
    impl_->order.push_back(name);
  };
  auto dense = [&](const auto& layer) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in(layer)));
    const bool zero = options_.zero_output && layer.name == impl_->arch.output.name;
    Tensor w = at::empty(weight_shape(layer), opts), b = at::empty({bias_size(layer)}, opts);
    if (zero) {
      w.zero_();
      b.zero_();
    } else {
      w.uniform_(-bound, bound, gen);
      b.uniform_(-bound, bound, gen);
    }
    add(layer.name + ".weight", w);
    add(layer.name + ".bias", b);
  };
  for_each_layer(impl_->arch, [&](const auto& layer) {
    using L = std::decay_t<decltype(layer)>;
    if constexpr (std::is_same_v<L, Norm>) {
      add(layer.name + ".weight", at::ones({layer.channels}, opts));
      add(layer.name + ".bias", at::zeros({layer.channels}, opts));
    } else {
      dense(layer);
    }
  });
  set_trainable(true);
}

// The adapters go on every convolution and linear layer; the network's tensors are shared, frozen.
UNetVelocity::UNetVelocity(const UNetVelocity& other, const LoraOptions& lora, uint64_t seed)
    : VelocityField(other.schedule()), options_(other.options_), lora_(lora), impl_(std::make_unique<Impl>()) {
  lora_.validate();
  if (other.has_lora()) throw Error("unet: the network already has LoRA adapters");
  impl_->arch = other.impl_->arch;
  impl_->weights = other.impl_->weights;
  impl_->order = other.impl_->order;
  impl_->lora_scale = lora_.alpha / static_cast<double>(lora_.rank);
  Generator gen = make_generator(seed);
  at::NoGradGuard no_grad;
  const auto opts = impl_->weights.begin()->second.options();
  for_each_layer(impl_->arch, [&](const auto& layer) {
    using L = std::decay_t<decltype(layer)>;
    if constexpr (!std::is_same_v<L, Norm>) {
      const int64_t in = fan_in(layer);
      // A as a dense layer's default initialisation, B = 0: W + s B A = W at the start.
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      // Drawn on the CPU (the generator's device) and moved: the same adapters on every device.
      Tensor a = at::empty({lora_.rank, in}, opts.device(at::kCPU)).uniform_(-bound, bound, gen).to(opts.device());
      Tensor b = at::zeros({weight_shape(layer)[0], lora_.rank}, opts);
      impl_->adapters[layer.name] = {a, b};
      impl_->adapter_order.push_back(layer.name);
    }
  });
  for (auto& [name, w] : impl_->weights) w.set_requires_grad(false);
  set_trainable(true);
}

UNetVelocity::~UNetVelocity() = default;

bool UNetVelocity::has_lora() const { return !impl_->adapters.empty(); }

int64_t UNetVelocity::largest_lora_rank() const {
  int64_t largest = 0;
  for_each_layer(impl_->arch, [&](const auto& layer) {
    if constexpr (!std::is_same_v<std::decay_t<decltype(layer)>, Norm>) {
      largest = std::max(largest, std::min(fan_in(layer), weight_shape(layer)[0]));
    }
  });
  return largest;
}

std::shared_ptr<UNetVelocity> UNetVelocity::with_lora(const LoraOptions& lora, uint64_t seed) const {
  return std::shared_ptr<UNetVelocity>(new UNetVelocity(*this, lora, seed));
}

Tensor UNetVelocity::velocity(const Tensor& x, const Tensor& t) const { return conditional_velocity(x, t, Tensor()); }

Tensor UNetVelocity::conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const {
  return conditioned(x, t, c, Tensor());
}

Tensor UNetVelocity::conditional_velocity_masked(const Tensor& x, const Tensor& t, const Tensor& c,
                                                 const Tensor& keep) const {
  if (options_.condition_dim == 0 || !c.defined()) return VelocityField::conditional_velocity_masked(x, t, c, keep);
  check_keep(keep, x.size(0));
  return conditioned(x, t, c, keep);
}

// With `keep`, the rows where it is false get the null condition's c = 0 and flag 0.
Tensor UNetVelocity::conditioned(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const {
  check_batch(x, dim(), "x");
  const int64_t B = x.size(0);
  check_time(t, B, "t");
  const UNetOptions& o = options_;
  const Impl& n = *impl_;
  const Architecture& a = n.arch;
  const int64_t g = o.groups;
  // The weights' dtype and device decide: a float64 network runs float64 (the finite-difference tests).
  const Tensor& w0 = n.at(a.input.name + ".weight");
  const auto opts = x.options().dtype(w0.scalar_type()).device(w0.device());
  Tensor emb = n.linear(a.time2, at::silu(n.linear(a.time1, embed_time(t, B, o.time_features, opts))));
  if (a.condition) {
    const Tensor rows = condition_rows(c, B, o.condition_dim, "unet");
    const Tensor flag = keep.defined() ? keep.to(opts).unsqueeze(1) : at::full({B, 1}, rows.defined() ? 1.0 : 0.0, opts);
    const Tensor cond = rows.defined() ? (keep.defined() ? rows.to(opts) * flag : rows.to(opts)) : at::zeros({B, o.condition_dim}, opts);
    emb = emb + n.linear(*a.condition, at::cat({cond, flag}, 1));
  } else if (c.defined()) {
    return VelocityField::conditional_velocity(x, t, c);  // the error naming the kind
  }
  emb = at::silu(emb);
  Tensor h = n.conv(a.input, x.to(opts).reshape({B, o.channels, o.height, o.width}));
  std::vector<Tensor> skips;
  for (const Level& level : a.levels) {
    for (const ResBlock& b : level.down) {
      h = n.block(b, h, emb, g);
      skips.push_back(h);
    }
    if (level.downsample) h = n.conv(*level.downsample, h);
  }
  h = n.block(a.mid1, h, emb, g);
  if (a.attention) h = n.attention(*a.attention, h, g);
  h = n.block(a.mid2, h, emb, g);
  for (size_t l = a.levels.size(); l-- > 0;) {
    for (const ResBlock& b : a.levels[l].up) {
      h = n.block(b, at::cat({h, skips.back()}, 1), emb, g);
      skips.pop_back();
    }
    if (a.levels[l].upsample) h = n.conv(*a.levels[l].upsample, at::upsample_nearest2d(h, {h.size(2) * 2, h.size(3) * 2}));
  }
  h = n.conv(a.output, at::silu(n.norm(a.out_norm, h, g)));
  return h.reshape({B, dim()}).to(x.scalar_type());
}

std::vector<Tensor> UNetVelocity::parameters() const {
  std::vector<Tensor> out;
  if (has_lora()) {
    for (const auto& name : impl_->adapter_order) {
      out.push_back(impl_->adapters.at(name).first);
      out.push_back(impl_->adapters.at(name).second);
    }
    return out;
  }
  for (const auto& name : impl_->order) out.push_back(impl_->weights.at(name));
  return out;
}

NamedTensors UNetVelocity::named_parameters() const {
  NamedTensors out;
  for (const auto& name : impl_->order) out.emplace_back(name, impl_->weights.at(name));
  for (const auto& name : impl_->adapter_order) {
    out.emplace_back(name + ".lora_a", impl_->adapters.at(name).first);
    out.emplace_back(name + ".lora_b", impl_->adapters.at(name).second);
  }
  return out;
}

void UNetVelocity::load_parameters(const NamedTensors& values) {
  std::map<std::string, Tensor> given;
  for (const auto& [name, value] : values) {
    if (!given.emplace(name, value).second) throw Error("unet: tensor '" + name + "' is given twice");
  }
  const NamedTensors mine = named_parameters();
  for (const auto& [name, value] : mine) {
    const auto it = given.find(name);
    if (it == given.end()) throw Error("unet: tensor '" + name + "' is missing");
    if (!it->second.sizes().equals(value.sizes())) {
      throw Error("unet: tensor '" + name + "' has shape " + shape_string(it->second) + ", expected " +
                  shape_string(value));
    }
  }
  if (given.size() != mine.size()) {
    for (const auto& [name, value] : given) {
      const bool known = std::any_of(mine.begin(), mine.end(), [&](const auto& m) { return m.first == name; });
      if (!known) throw Error("unet: unexpected tensor '" + name + "'");
    }
  }
  at::NoGradGuard no_grad;
  for (const auto& [name, value] : mine) const_cast<Tensor&>(value).copy_(given.at(name));
}

void UNetVelocity::set_trainable(bool trainable) {
  for (const Tensor& p : parameters()) const_cast<Tensor&>(p).set_requires_grad(trainable);
}

VelocityFieldPtr UNetVelocity::clone() const {
  std::shared_ptr<UNetVelocity> copy =
      has_lora() ? std::make_shared<UNetVelocity>(options_, schedule(), 0)->with_lora(lora_, 0)
                 : std::make_shared<UNetVelocity>(options_, schedule(), 0);
  const Tensor& w0 = impl_->weights.begin()->second;
  copy->cast(w0.options());
  copy->load_parameters(named_parameters());
  // Trainable where this one is.
  const std::vector<Tensor> mine = parameters();
  const bool trainable = !mine.empty() && mine.front().requires_grad();
  copy->set_trainable(trainable);
  return copy;
}

namespace {

// A number as TorchScript source, to the last bit of the double.
std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// TorchScript source of the forward pass (E124), line by line, mirroring UNetVelocity::Impl; `weights` are the
// tensors the layers compute with ("<layer>.weight" with any adapters merged in, "<layer>.bias").
class ScriptWriter {
 public:
  ScriptWriter(const std::map<std::string, Tensor>& weights, int64_t groups) : weights_(weights), groups_(groups) {}

  std::string conv(const Conv& c, const std::string& x) {
    const std::string s = std::to_string(c.stride), p = std::to_string(c.kernel / 2);
    return "torch.conv2d(" + x + ", " + weight(c) + ", " + tensor(c.name + ".bias") + ", [" + s + ", " + s + "], [" +
           p + ", " + p + "])";
  }
  std::string linear(const Linear& l, const std::string& x) {
    return "torch.linear(" + x + ", " + weight(l) + ", " + tensor(l.name + ".bias") + ")";
  }
  std::string norm(const Norm& m, const std::string& x) {
    return "torch.group_norm(" + x + ", " + std::to_string(groups_) + ", " + tensor(m.name + ".weight") + ", " +
           tensor(m.name + ".bias") + ", 1e-05)";
  }
  // h = block(x): GroupNorm, SiLU, conv; plus the embedding; GroupNorm, SiLU, conv; plus x (or its 1x1 conv).
  void block(const ResBlock& b, const std::string& x) {
    line("r = " + conv(b.conv1, "torch.silu(" + norm(b.norm1, x) + ")"));
    line("r = r + " + linear(b.emb, "emb") + ".unsqueeze(-1).unsqueeze(-1)");
    line("r = " + conv(b.conv2, "torch.silu(" + norm(b.norm2, "r") + ")"));
    line("h = r + " + (b.skip ? conv(*b.skip, x) : x));
  }
  void attention(const Attention& a, int64_t channels) {
    const std::string C = std::to_string(channels);
    line("hw = h.size(2) * h.size(3)");
    line("qkv = " + conv(a.qkv, norm(a.norm, "h")) + ".reshape(h.size(0), 3, " + C + ", hw)");
    line("q = qkv.select(1, 0)");
    line("k = qkv.select(1, 1)");
    line("v = qkv.select(1, 2)");
    line("p = torch.softmax(torch.matmul(q.transpose(1, 2), k) / " + number(std::sqrt(static_cast<double>(channels))) +
         ", -1)");
    line("o = torch.matmul(v, p.transpose(1, 2)).reshape(h.size(0), " + C + ", h.size(2), h.size(3))");
    line("h = h + " + conv(a.proj, "o"));
  }
  void line(const std::string& text) { source += "    " + text + "\n"; }

  std::string source;
  NamedTensors tensors;

 private:
  // self.<name> for a tensor of the network (each layer is used once, so each tensor is registered once).
  std::string tensor(const std::string& name) {
    std::string attr = name;
    std::replace(attr.begin(), attr.end(), '.', '_');
    tensors.emplace_back(attr, weights_.at(name).detach().clone());
    return "self." + attr;
  }
  template <class Layer>
  std::string weight(const Layer& layer) { return tensor(layer.name + ".weight"); }
  const std::map<std::string, Tensor>& weights_;
  int64_t groups_;
};

}  // namespace

UNetVelocity::ScriptForm UNetVelocity::script_form() const {
  const UNetOptions& o = options_;
  const Architecture& a = impl_->arch;
  std::map<std::string, Tensor> merged;
  {
    at::NoGradGuard no_grad;
    for_each_layer(a, [&](const auto& layer) {
      merged[layer.name + ".weight"] = impl_->weight(layer);
      merged[layer.name + ".bias"] = impl_->at(layer.name + ".bias");
    });
  }
  ScriptWriter w(merged, o.groups);
  const int64_t dc = o.condition_dim, half = o.time_features / 2;
  w.source = dc > 0 ? "def forward(self, x, t, c: Optional[Tensor]):\n" : "def forward(self, x, t):\n";
  w.line("B = x.size(0)");
  w.line("dt = self.input_weight.dtype");
  // E124's time features: sin and cos of t w_k, w_k = 1000^(1 - k / (n/2)).
  w.line("kk = torch.arange(" + std::to_string(half) + ", dtype=dt, device=x.device)");
  w.line("freq = torch.exp((1.0 - kk / " + number(static_cast<double>(half)) + ") * " + number(std::log(1000.0)) + ")");
  w.line("arg = t.to(dt).reshape(-1, 1).expand(B, 1) * freq.unsqueeze(0)");
  w.line("emb = torch.cat([torch.sin(arg), torch.cos(arg)], 1)");
  w.line("emb = " + w.linear(a.time2, "torch.silu(" + w.linear(a.time1, "emb") + ")"));
  if (a.condition) {
    w.line("if c is None:");
    w.line("    cc = torch.zeros(B, " + std::to_string(dc) + ", dtype=dt, device=x.device)");
    w.line("    flag = torch.zeros(B, 1, dtype=dt, device=x.device)");
    w.line("else:");
    w.line("    cc = c.to(dt).expand(B, " + std::to_string(dc) + ")");
    w.line("    flag = torch.ones(B, 1, dtype=dt, device=x.device)");
    w.line("emb = emb + " + w.linear(*a.condition, "torch.cat([cc, flag], 1)"));
  }
  w.line("emb = torch.silu(emb)");
  w.line("h = " + w.conv(a.input, "x.to(dt).reshape(B, " + std::to_string(o.channels) + ", " +
                                       std::to_string(o.height) + ", " + std::to_string(o.width) + ")"));
  int skips = 0;
  for (const Level& level : a.levels) {
    for (const ResBlock& b : level.down) {
      w.block(b, "h");
      w.line("s" + std::to_string(skips++) + " = h");
    }
    if (level.downsample) w.line("h = " + w.conv(*level.downsample, "h"));
  }
  w.block(a.mid1, "h");
  if (a.attention) w.attention(*a.attention, a.attention->norm.channels);
  w.block(a.mid2, "h");
  for (size_t l = a.levels.size(); l-- > 0;) {
    for (const ResBlock& b : a.levels[l].up) {
      w.line("h = torch.cat([h, s" + std::to_string(--skips) + "], 1)");
      w.block(b, "h");
    }
    if (a.levels[l].upsample) {
      w.line("h = " + w.conv(*a.levels[l].upsample, "torch.upsample_nearest2d(h, [h.size(2) * 2, h.size(3) * 2])"));
    }
  }
  w.line("h = " + w.conv(a.output, "torch.silu(" + w.norm(a.out_norm, "h") + ")"));
  w.line("return h.reshape(B, " + std::to_string(o.dim()) + ").to(x.dtype)");
  return {w.source, w.tensors};
}

void UNetVelocity::cast(const at::TensorOptions& options) {
  std::vector<Tensor> all;
  for (const auto& [name, w] : impl_->weights) all.push_back(w);
  for (const auto& [name, ab] : impl_->adapters) all.insert(all.end(), {ab.first, ab.second});
  move_tensors(all, options);
}

}  // namespace tilt
