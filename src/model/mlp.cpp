#include "tilt/model/mlp.h"
#include "tilt/model/condition.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "gemm.h"
#include "mlp_tape.h"
#include "silu_kernel.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <cmath>
#include <map>

namespace tilt {

struct MlpVelocity::Impl {
  torch::nn::Sequential net;             // names the parameters ("0.weight", ...) in files
  std::vector<torch::nn::Linear> layers; // the same layers, for the hand-written passes
};

namespace {

constexpr double kPi = 3.14159265358979323846;

void validate(const MlpOptions& o) {
  if (o.dim < 1) throw Error("mlp: dim must be >= 1, got " + std::to_string(o.dim));
  if (o.hidden.empty()) throw Error("mlp: needs at least one hidden layer");
  for (int64_t w : o.hidden) {
    if (w < 1) throw Error("mlp: hidden widths must be >= 1, got " + std::to_string(w));
  }
  if (o.time_features < 0 || o.time_features % 2 != 0) {
    throw Error("mlp: time_features must be an even number >= 0, got " + std::to_string(o.time_features));
  }
  if (o.condition_dim < 0) throw Error("mlp: condition_dim must be >= 0, got " + std::to_string(o.condition_dim));
}

// The first layer's inputs: x, the time embedding, and for a conditional network c and its flag.
int64_t input_width(const MlpOptions& o) {
  return o.dim + 1 + o.time_features + (o.condition_dim > 0 ? o.condition_dim + 1 : 0);
}

// [t, sin(pi f t), cos(pi f t) for f = 1..n/2], shape [B, 1 + n].
Tensor embed_time(const Tensor& t, int64_t batch, int64_t n, const at::TensorOptions& opts) {
  Tensor tt = t.to(opts.dtype()).reshape({-1, 1}).expand({batch, 1});
  if (n == 0) return tt;
  const Tensor f = at::arange(1, n / 2 + 1, opts) * kPi;
  const Tensor arg = tt * f.unsqueeze(0);
  return at::cat({tt, at::sin(arg), at::cos(arg)}, 1);
}

// The same embedding at a single time, [1, 1 + n], from scalars: one tensor instead of ten operations.
Tensor embed_time_row(double t, int64_t n, const at::TensorOptions& opts) {
  std::vector<double> e{t};
  for (int64_t f = 1; f <= n / 2; ++f) e.push_back(std::sin(kPi * f * t));
  for (int64_t f = 1; f <= n / 2; ++f) e.push_back(std::cos(kPi * f * t));
  return at::tensor(e, opts.dtype(at::kDouble)).to(opts).reshape({1, -1});
}

}  // namespace

MlpVelocity::MlpVelocity(const MlpOptions& options, SchedulePtr schedule, uint64_t seed)
    : VelocityField(std::move(schedule)), options_(options), impl_(std::make_unique<Impl>()) {
  validate(options_);
  Generator gen = make_generator(seed);
  int64_t in = input_width(options_);
  std::vector<int64_t> widths = options_.hidden;
  widths.push_back(options_.dim);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < widths.size(); ++i) {
    torch::nn::Linear layer(in, widths[i]);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    const bool last = i + 1 == widths.size();
    if (last && options_.zero_output) {
      layer->weight.zero_();
      layer->bias.zero_();
    } else {
      layer->weight.uniform_(-bound, bound, gen);
      layer->bias.uniform_(-bound, bound, gen);
    }
    impl_->net->push_back(layer);
    impl_->layers.push_back(layer);
    if (!last) impl_->net->push_back(torch::nn::SiLU());
    in = widths[i];
  }
}

MlpVelocity::~MlpVelocity() = default;

Tensor MlpVelocity::velocity(const Tensor& x, const Tensor& t) const { return conditional_velocity(x, t, Tensor()); }

Tensor MlpVelocity::conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const {
  return conditioned(x, t, c, Tensor());
}

Tensor MlpVelocity::conditional_velocity_masked(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const {
  if (options_.condition_dim == 0 || !c.defined()) return VelocityField::conditional_velocity_masked(x, t, c, keep);
  check_keep(keep, x.size(0));
  return conditioned(x, t, c, keep);
}

// The network on [x, time embedding, c, flag]; with `keep`, the rows where it is false get the null
// condition's c = 0 and flag 0.
Tensor MlpVelocity::conditioned(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const {
  check_batch(x, options_.dim, "x");
  check_time(t, x.size(0), "t");
  const auto weights_dtype = impl_->layers.front()->weight.scalar_type();
  if (x.scalar_type() != weights_dtype) {  // as the U-Net: the weights' dtype computes, x's comes back
    return conditioned(x.to(weights_dtype), t, c, keep).to(x.scalar_type());
  }
  const int64_t dc = options_.condition_dim;
  if (dc == 0 && c.defined()) return VelocityField::conditional_velocity(x, t, c);  // the error naming the kind
  // The condition's columns of the first layer's input: [c, 1] (with `keep`, [c keep, keep]); none for the null
  // condition (c = 0, flag 0), which adds nothing.
  Tensor condition;
  if (dc > 0 && c.defined()) {
    const Tensor rows = condition_rows(c, x.size(0), dc, "mlp").to(x.options());
    const Tensor flag = keep.defined() ? keep.to(x.options()).unsqueeze(1) : at::ones({x.size(0), 1}, x.options());
    condition = at::cat({rows * flag, flag}, 1);
  }
  // Without gradients, at one time for the whole batch, on the CPU: the network's own fused pass (forward_taped's,
  // without a tape: tilt's products and the fused bias-SiLU, as Adjoint Matching's rollout steps it) instead of the
  // module's layers one by one. The same function to float rounding (the demo's 60-step samples within 1e-5); the
  // samplers, the evaluations and the other losses' rollouts (dsm_until's weighted ones) step it: 20000 samples of
  // the demo 2.5-3.2 s -> 1.2 s, preset "small"'s iteration 1.7x faster (scripts/preset_cost.sh).
  if (t.numel() == 1 && x.device().is_cpu() && !at::GradMode::is_enabled()) {
    return fused_forward(x, t.item<double>(), condition, nullptr, false);
  }
  std::vector<Tensor> inputs{x, embed_time(t, x.size(0), options_.time_features, x.options())};
  if (dc > 0) inputs.push_back(condition.defined() ? condition : at::zeros({x.size(0), dc + 1}, x.options()));
  return impl_->net->forward(at::cat(inputs, 1));
}

namespace {

// The tensor in *slot if it already has these sizes and options and nothing else refers to it or to its
// storage; otherwise a new one, stored in *slot. A tape reused from one iteration to the next thus
// allocates nothing: fresh memory costs a page fault per 4 KB on first touch (measured ~1.6 us each on
// a VM, a third of the time of the 256 x 256 product that fills it).
Tensor reuse(Tensor* slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (slot->defined() && slot->sizes().equals(sizes) && slot->dtype() == opts.dtype() &&
      slot->device() == opts.device() && slot->is_contiguous() && slot->use_count() == 1 &&
      slot->storage().use_count() == 1) {
    return *slot;
  }
  *slot = at::empty(sizes, opts);
  return *slot;
}

// The MLP's own tape behind the interface (a tape of another network is an error, not a crash).
MlpTape& mlp_tape(Tape& tape) {
  auto* mine = dynamic_cast<MlpTape*>(&tape);
  if (!mine) throw Error("mlp: the tape was not made by MlpVelocity::new_tape");
  return *mine;
}
const MlpTape& mlp_tape(const Tape& tape) { return mlp_tape(const_cast<Tape&>(tape)); }

}  // namespace

std::unique_ptr<Tape> MlpVelocity::new_tape() const { return std::make_unique<MlpTape>(); }

// The layers are z_1 = W_1 [x, e(t)] + b_1, z_{l+1} = W_{l+1} silu(z_l) + b_{l+1}, v = z_L. Splitting
// W_1 = [W_1x | W_1t] gives z_1 = x W_1x^T + (b_1 + e(t) W_1t^T): at one time t the second term is a
// single row, broadcast over the batch. Each hidden layer is one matrix product without bias and one
// fused pass (detail::bias_silu) that adds the bias, applies SiLU and, for a tape, leaves silu'(z_l) in
// the product's buffer. The tape's tensors are overwritten in place when they can be (see reuse()).
Tensor MlpVelocity::forward_taped(const Tensor& x, double t, Tape* any_tape, bool keep_activations) const {
  return fused_forward(x, t, Tensor(), any_tape, keep_activations);
}

// ... and with a condition's columns [B, dc + 1] of the first layer's input, z_1 += [c, flag] W_1c^T (one more
// product; the tape's backward passes treat them as constants, and parameter_grads gives W_1c no gradient).
Tensor MlpVelocity::fused_forward(const Tensor& x, double t, const Tensor& condition, Tape* any_tape,
                                  bool keep_activations) const {
  check_batch(x, options_.dim, "x");
  MlpTape* tape = any_tape ? &mlp_tape(*any_tape) : nullptr;
  at::NoGradGuard no_grad;
  const auto& L = impl_->layers;
  const int64_t d = options_.dim, B = x.size(0);
  const size_t hidden = L.size() - 1;
  const Tensor& W1 = L[0]->weight;
  const Tensor e = embed_time_row(t, options_.time_features, x.options());
  Tensor bias = at::addmm(L[0]->bias.unsqueeze(0), e, W1.narrow(1, d, e.size(1)).t());
  if (tape) {
    tape->t = t;
    tape->x = x;
    tape->slope.resize(hidden);
    tape->h.resize(keep_activations ? hidden : 0);
  }
  Tensor scratch_z, scratch_h;
  auto product_buffer = [&](size_t l) {
    const int64_t H = L[l]->weight.size(0);
    return tape ? reuse(&tape->slope[l], {B, H}, x.options()) : reuse(&scratch_z, {B, H}, x.options());
  };
  Tensor z = product_buffer(0);
  detail::gemm(z, x, false, W1.narrow(1, 0, d), true, 0.0);
  if (condition.defined()) {
    detail::gemm(z, condition.contiguous(), false, W1.narrow(1, d + e.size(1), condition.size(1)), true, 1.0);
  }
  for (size_t l = 1; l < L.size(); ++l) {
    Tensor h = keep_activations && tape ? reuse(&tape->h[l - 1], z.sizes(), z.options())
                                              : reuse(&scratch_h, z.sizes(), z.options());
    detail::bias_silu(z, bias, h, /*keep_slope=*/tape != nullptr);
    if (l == hidden) {
      Tensor v = L[l]->bias.unsqueeze(0).repeat({B, 1});
      detail::gemm(v, h, false, L[l]->weight, true, 1.0);
      return v;
    }
    z = Tensor();  // let the scratch buffer be reused
    z = product_buffer(l);
    detail::gemm(z, h, false, L[l]->weight, true, 0.0);
    bias = L[l]->bias;
  }
  return z;  // not reached: there is at least one hidden layer
}

namespace {

// The gradient with respect to a hidden layer's activation input, from the gradient g with respect to
// its output: (g W) * silu'(z) of the layer below.
Tensor backward_layer(const Tensor& g, const Tensor& W, const Tensor& slope) {
  Tensor out = at::empty({g.size(0), W.size(1)}, g.options());
  detail::gemm(out, g, false, W, false, 0.0);
  return out.mul_(slope);
}

}  // namespace

// (dv/dx)^T a = W_1x^T D_1 W_2^T D_2 ... W_L^T a with D_l = diag(silu'(z_l)), applied right to left.
Tensor MlpVelocity::vjp_taped(const Tape& any_tape, const Tensor& a) const {
  check_batch(a, options_.dim, "adjoint");
  const MlpTape& tape = mlp_tape(any_tape);
  at::NoGradGuard no_grad;
  const auto& L = impl_->layers;
  if (tape.slope.size() + 1 != L.size()) throw Error("mlp: the tape has no activations of this network");
  Tensor g = a;
  for (size_t l = L.size() - 1; l >= 1; --l) g = backward_layer(g, L[l]->weight, tape.slope[l - 1]);
  Tensor out = at::empty({a.size(0), options_.dim}, a.options());
  detail::gemm(out, g, false, L[0]->weight.narrow(1, 0, options_.dim), false, 0.0);
  return out;
}

Tensor MlpVelocity::vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out) const {
  MlpTape tape;
  const Tensor v = forward_taped(x.detach(), t, &tape);
  if (v_out) *v_out = v;
  return vjp_taped(tape, a);
}

// Backpropagation by hand through the taped layers, one tape (one time) at a time, the gradients of
// the weights accumulated over tapes: dW_l += g_l^T silu(z_{l-1}), db_l += sum_rows g_l,
// g_{l-1} = (g_l W_l) silu'(z_{l-1}); and for the first layer dW_1x += g_1^T x, dW_1t += (sum_rows g_1)^T e(t).
std::vector<Tensor> MlpVelocity::parameter_grads(const std::vector<const Tape*>& tapes,
                                                 const std::vector<Tensor>& g) const {
  if (tapes.size() != g.size()) throw Error("mlp: parameter_grads needs one output gradient per tape");
  at::NoGradGuard no_grad;
  const auto& L = impl_->layers;
  const int64_t d = options_.dim;
  std::vector<Tensor> dW(L.size()), db(L.size());
  for (size_t l = 0; l < L.size(); ++l) {
    dW[l] = at::zeros_like(L[l]->weight);
    db[l] = at::zeros_like(L[l]->bias);
  }
  const int64_t in_t = 1 + options_.time_features;  // a condition's columns (null: c = 0, flag 0) get no gradient
  Tensor g_sums = at::empty({static_cast<int64_t>(tapes.size()), L[0]->weight.size(0)}, L[0]->weight.options());
  Tensor embeddings = at::empty({static_cast<int64_t>(tapes.size()), in_t}, L[0]->weight.options());
  for (size_t i = 0; i < tapes.size(); ++i) {
    const MlpTape& tape = mlp_tape(*tapes[i]);
    if (tape.h.size() + 1 != L.size() || tape.slope.size() + 1 != L.size()) {
      throw Error("mlp: parameter_grads needs tapes recorded with keep_activations");
    }
    check_batch(g[i], d, "output gradient");
    Tensor gl = g[i];
    for (size_t l = L.size() - 1; l >= 1; --l) {
      detail::gemm(dW[l], gl, true, tape.h[l - 1], false, 1.0);
      db[l].add_(gl.sum(0));
      gl = backward_layer(gl, L[l]->weight, tape.slope[l - 1]);
    }
    detail::gemm(dW[0].narrow(1, 0, d), gl, true, tape.x, false, 1.0);
    g_sums[static_cast<int64_t>(i)].copy_(gl.sum(0));
    embeddings[static_cast<int64_t>(i)].copy_(embed_time_row(tape.t, options_.time_features, tape.x.options())[0]);
  }
  dW[0].narrow(1, d, in_t).addmm_(g_sums.t(), embeddings);
  db[0].add_(g_sums.sum(0));
  std::vector<Tensor> out;
  for (size_t l = 0; l < L.size(); ++l) {
    out.push_back(dW[l]);
    out.push_back(db[l]);
  }
  return out;
}

std::vector<Tensor> MlpVelocity::parameters() const {
  std::vector<Tensor> out;
  for (const auto& p : impl_->net->parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

NamedTensors MlpVelocity::named_parameters() const {
  NamedTensors out;
  for (const auto& item : impl_->net->named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

void MlpVelocity::load_parameters(const NamedTensors& values) {
  std::map<std::string, Tensor> given(values.begin(), values.end());
  at::NoGradGuard no_grad;
  for (auto& item : impl_->net->named_parameters()) {
    auto it = given.find(item.key());
    if (it == given.end()) throw Error("mlp: parameter '" + item.key() + "' is missing");
    if (!it->second.sizes().equals(item.value().sizes())) {
      throw Error("mlp: parameter '" + item.key() + "' must be " + shape_string(item.value()) +
                  ", got " + shape_string(it->second));
    }
    item.value().copy_(it->second);
    given.erase(it);
  }
  if (!given.empty()) throw Error("mlp: unexpected parameter '" + given.begin()->first + "'");
}

void MlpVelocity::set_trainable(bool trainable) {
  for (auto& p : impl_->net->parameters()) p.set_requires_grad(trainable);
}

std::string matrix_library() { return detail::gemm_library(); }

VelocityFieldPtr MlpVelocity::clone() const {
  auto copy = std::make_shared<MlpVelocity>(options_, schedule(), 0);
  copy->load_parameters(named_parameters());
  const NamedTensors mine = named_parameters(), theirs = copy->named_parameters();
  for (size_t i = 0; i < mine.size(); ++i) theirs[i].second.set_requires_grad(mine[i].second.requires_grad());
  return copy;
}

}  // namespace tilt
