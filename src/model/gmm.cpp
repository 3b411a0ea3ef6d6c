#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <vector>

namespace tilt {
namespace {

constexpr double kLog2Pi = 1.8378770664093454836;

Tensor as_double(const Tensor& x, const char* what) {
  if (!x.defined()) throw Error(std::string("Gaussian mixture: ") + what + " is undefined");
  return x.to(at::kDouble).contiguous();
}

// Reshapes a schedule quantity (0-dim or [B]) to broadcast against [K, B, d].
Tensor bcast(const Tensor& s) { return s.dim() == 0 ? s : s.reshape({1, -1, 1}); }

Tensor symmetrise(const Tensor& m) { return 0.5 * (m + m.transpose(-1, -2)); }

// The mixture of weights softmax(log_w). A component whose weight underflows to 0 next to the others (a strong tilt
// makes exp(log_w_k - max) smaller than the smallest double) is left out: it holds no representable mass, and
// a mixture's weights must be positive.
GaussianMixture from_log_weights(const Tensor& log_w, const Tensor& means, const Tensor& covariances) {
  const Tensor w = at::softmax(log_w, 0);
  const Tensor kept = at::nonzero(w > 0).reshape({-1});
  if (kept.numel() == w.numel()) return GaussianMixture(w, means, covariances);
  return GaussianMixture(w.index_select(0, kept), means.index_select(0, kept), covariances.index_select(0, kept));
}

}  // namespace

// The velocity and its VJP at one time, as one loop over the rows instead of some thirty tensor operations on
// [K, B, d] (which, for a small mixture, cost more in dispatch than in arithmetic). The same formulas as
// GaussianMixture::velocity and velocity_vjp below, accumulated in double per row: in each component's eigenbasis
// y_k = U_k^T (x - alpha mu_k), with U (eigenvectors, [K, d, d], contiguous double) undefined for diagonal
// covariances (the standard basis). a may be undefined (velocity only); v or g may be null.
template <typename scalar_t>
void fused_rows(const Tensor& x_in, const Tensor& a_in, const Tensor& means, const Tensor& lambdas, const Tensor& U_in,
                const Tensor& log_weights, double al, double be, double dal, double dbe, Tensor* v_out, Tensor* g_out) {
  const Tensor x = x_in.contiguous();
  const Tensor a = a_in.defined() ? a_in.to(x.scalar_type()).contiguous() : a_in;
  const int64_t B = x.size(0), d = x.size(1), K = means.size(0);
  const double* mu = means.data_ptr<double>();
  const double* lam = lambdas.data_ptr<double>();
  const double* logw = log_weights.data_ptr<double>();
  const double* U = U_in.defined() ? U_in.data_ptr<double>() : nullptr;  // U[(k d + i) d + m]: U_k's row i, column m
  // Per component and coordinate: var = alpha^2 lambda + beta^2, coef = (alpha' alpha lambda + beta' beta) / var.
  std::vector<double> var(static_cast<size_t>(K * d)), coef(var.size()), log_norm(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    double s = logw[k] - 0.5 * static_cast<double>(d) * kLog2Pi;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t i = k * d + j;
      var[i] = al * al * lam[i] + be * be;
      coef[i] = (dal * al * lam[i] + dbe * be) / var[i];
      s -= 0.5 * std::log(var[i]);
    }
    log_norm[k] = s;
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = a.defined() ? a.data_ptr<scalar_t>() : nullptr;
  if (v_out) *v_out = at::empty_like(x);
  if (g_out) *g_out = at::empty_like(x);
  scalar_t* vp = v_out ? v_out->template data_ptr<scalar_t>() : nullptr;
  scalar_t* gp = g_out ? g_out->template data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> gamma(static_cast<size_t>(K)), avk(static_cast<size_t>(K)), y(static_cast<size_t>(K * d)),
        in(static_cast<size_t>(K * d)), diff(static_cast<size_t>(d)), a_row(static_cast<size_t>(d)),
        out(static_cast<size_t>(d));
    // dst = U_k^T src (in the standard basis: src).
    const auto to_eigenbasis = [&](int64_t k, const double* src, double* dst) {
      if (!U) {
        for (int64_t i = 0; i < d; ++i) dst[i] = src[i];
        return;
      }
      for (int64_t m = 0; m < d; ++m) dst[m] = 0;
      for (int64_t i = 0; i < d; ++i) {
        const double* row = U + (k * d + i) * d;
        for (int64_t m = 0; m < d; ++m) dst[m] += src[i] * row[m];
      }
    };
    // out = sum_k U_k in_k (in the standard basis: sum_k in_k).
    const auto rotate_back = [&](double* result) {
      for (int64_t i = 0; i < d; ++i) {
        double r = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double* in_k = in.data() + k * d;
          if (!U) {
            r += in_k[i];
            continue;
          }
          const double* row = U + (k * d + i) * d;
          for (int64_t m = 0; m < d; ++m) r += row[m] * in_k[m];
        }
        result[i] = r;
      }
    };
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xb = xp + b * d;
      double top = -INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        double* yk = y.data() + k * d;
        for (int64_t i = 0; i < d; ++i) diff[i] = static_cast<double>(xb[i]) - al * mu[k * d + i];
        to_eigenbasis(k, diff.data(), yk);
        double q = 0;
        for (int64_t j = 0; j < d; ++j) q += yk[j] * yk[j] / var[k * d + j];
        gamma[k] = log_norm[k] - 0.5 * q;
        top = std::max(top, gamma[k]);
      }
      double total = 0;
      for (int64_t k = 0; k < K; ++k) total += (gamma[k] = std::exp(gamma[k] - top));  // unnormalised gamma_k
      for (int64_t k = 0; k < K; ++k) gamma[k] /= total;
      if (vp) {
        // v = sum_k gamma_k (alpha' mu_k + U_k (coef_k y_k)).
        for (int64_t i = 0; i < K * d; ++i) in[i] = gamma[i / d] * coef[i] * y[i];
        rotate_back(out.data());
        for (int64_t j = 0; j < d; ++j) {
          double v = out[j];
          for (int64_t k = 0; k < K; ++k) v += gamma[k] * dal * mu[k * d + j];
          vp[b * d + j] = static_cast<scalar_t>(v);
        }
      }
      if (gp) {
        // (dv/dx)^T a = sum_k gamma_k U_k [coef_k a_k - (a.v_k - a.v) y_k / var_k], a_k = U_k^T a, and
        // a.v_k = alpha' a.mu_k + a_k.(coef_k y_k).
        for (int64_t j = 0; j < d; ++j) a_row[j] = static_cast<double>(ap[b * d + j]);
        double a_v = 0;
        for (int64_t k = 0; k < K; ++k) {
          double* a_k = in.data() + k * d;  // a_k first, then overwritten by the bracket
          to_eigenbasis(k, a_row.data(), a_k);
          double s = 0;
          for (int64_t j = 0; j < d; ++j) {
            const int64_t i = k * d + j;
            s += a_row[j] * dal * mu[i] + a_k[j] * coef[i] * y[i];
          }
          avk[k] = s;
          a_v += gamma[k] * s;
        }
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t j = 0; j < d; ++j) {
            const int64_t i = k * d + j;
            in[i] = gamma[k] * (coef[i] * in[i] - (avk[k] - a_v) * y[i] / var[i]);
          }
        }
        rotate_back(out.data());
        for (int64_t j = 0; j < d; ++j) gp[b * d + j] = static_cast<scalar_t>(out[j]);
      }
    }
  });
}

// Whether the fused loop may replace the tensor expressions: one time for the batch, a floating x, no autograd
// graph wanted through the result, and diagonal covariances or few dimensions (the rotations are O(K d^2) scalar
// work per row; beyond kFusedRotationMaxDim the batched products win: bench/am_bench.cpp, BM_MixtureVjp).
constexpr int64_t kFusedRotationMaxDim = 12;
bool fused_applies(bool diagonal, const Tensor& x, const ScheduleTensors& s, const Tensor& a) {
  if (s.alpha.dim() != 0 || x.dim() != 2) return false;
  if (!diagonal && x.size(1) > kFusedRotationMaxDim) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  if (at::GradMode::is_enabled() && (x.requires_grad() || (a.defined() && a.requires_grad()))) return false;
  return true;
}

// Components first ([K, B, d]): one batched product over the K components instead of B * K tiny ones.
struct GaussianMixture::Parts {
  Tensor y;        // U_k^T (x - alpha mu_k), [K, B, d]
  Tensor var;      // alpha^2 lambda_k + beta^2, [K, B or 1, d]
  Tensor log_post; // log gamma_k(x), [K, B]
  Tensor log_p;    // log p_t(x), [B]
  Tensor U;        // eigenvectors in x's dtype, [K, d, d]; undefined when every Sigma_k is diagonal
  Tensor mu;       // means in x's dtype, [K, d]
};

GaussianMixture::GaussianMixture(Tensor weights, Tensor means, Tensor covariances) {
  weights_ = as_double(weights, "weights");
  means_ = as_double(means, "means");
  covariances_ = as_double(covariances, "covariances");
  if (weights_.dim() != 1) throw Error("Gaussian mixture: weights must be [K], got " + shape_string(weights_));
  const int64_t K = weights_.size(0);
  if (K < 1) throw Error("Gaussian mixture: needs at least one component");
  if (means_.dim() != 2 || means_.size(0) != K) {
    throw Error("Gaussian mixture: means must be [K, d] with K = " + std::to_string(K) + ", got " +
                shape_string(means_));
  }
  const int64_t d = means_.size(1);
  if (covariances_.dim() != 3 || covariances_.size(0) != K || covariances_.size(1) != d ||
      covariances_.size(2) != d) {
    throw Error("Gaussian mixture: covariances must be [K, d, d] = [" + std::to_string(K) + ", " +
                std::to_string(d) + ", " + std::to_string(d) + "], got " + shape_string(covariances_));
  }
  if (!weights_.isfinite().all().item<bool>() || !(weights_ > 0).all().item<bool>()) {
    throw Error("Gaussian mixture: weights must be finite and positive");
  }
  if (!means_.isfinite().all().item<bool>() || !covariances_.isfinite().all().item<bool>()) {
    throw Error("Gaussian mixture: means and covariances must be finite");
  }
  if ((covariances_ - covariances_.transpose(1, 2)).abs().max().item<double>() >
      1e-9 * (1.0 + covariances_.abs().max().item<double>())) {
    throw Error("Gaussian mixture: covariances must be symmetric");
  }
  weights_ = weights_ / weights_.sum();
  auto eig = at::linalg_eigh(covariances_);
  eigenvalues_ = std::get<0>(eig).contiguous();
  eigenvectors_ = std::get<1>(eig).contiguous();  // row-major, as fused_rows reads it
  if (!(eigenvalues_ > 0).all().item<bool>()) {
    throw Error("Gaussian mixture: covariances must be positive definite (smallest eigenvalue " +
                std::to_string(eigenvalues_.min().item<double>()) + ")");
  }
  cholesky_ = at::linalg_cholesky(covariances_);
  // Diagonal covariances (isotropic ones included): the eigenbasis is the standard one, so the
  // rotations can be skipped.
  diagonal_ = at::equal(covariances_, at::diag_embed(at::diagonal(covariances_, 0, 1, 2)));
  if (diagonal_) eigenvalues_ = at::diagonal(covariances_, 0, 1, 2).contiguous();
  log_weights_ = at::log(weights_).contiguous();
}

GaussianMixture::Parts GaussianMixture::evaluate(const Tensor& x, const Tensor& alpha,
                                                 const Tensor& beta) const {
  check_batch(x, dim(), "x");
  const auto opts = x.options();
  Parts p;
  p.mu = means_.to(opts.dtype());
  const Tensor lam = eigenvalues_.to(opts.dtype());
  const Tensor a = bcast(alpha.to(opts.dtype()));
  const Tensor b = bcast(beta.to(opts.dtype()));
  const Tensor diff = x.unsqueeze(0) - a * p.mu.unsqueeze(1);               // [K, B, d]
  if (diagonal_) {
    p.y = diff;
  } else {
    p.U = eigenvectors_.to(opts.dtype());
    p.y = at::bmm(diff, p.U);                                               // [K, B, d]
  }
  p.var = a * a * lam.unsqueeze(1) + b * b;                                 // [K, ., d]
  const Tensor log_n = -0.5 * (p.y * p.y / p.var + at::log(p.var)).sum(-1) -
                       0.5 * static_cast<double>(dim()) * kLog2Pi;         // [K, B]
  const Tensor joint = log_n + at::log(weights_.to(opts.dtype())).unsqueeze(1);
  p.log_p = at::logsumexp(joint, {0});
  p.log_post = joint - p.log_p.unsqueeze(0);
  return p;
}

Tensor GaussianMixture::sample(int64_t n, Generator& gen, at::ScalarType dtype) const {
  // As tilt::sample: n = 0 is an empty batch (LibTorch's multinomial refuses it), a negative n an error.
  if (n < 0) throw Error("Gaussian mixture: cannot draw " + std::to_string(n) + " samples");
  if (!at::isFloatingType(dtype)) throw Error("Gaussian mixture: samples must be of a floating-point dtype");
  if (n == 0) return at::empty({0, dim()}, at::TensorOptions().dtype(dtype));
  const Tensor idx = at::multinomial(weights_, n, /*replacement=*/true, gen);
  const Tensor z = at::randn({n, dim(), 1}, gen, at::TensorOptions().dtype(at::kDouble));
  const Tensor x = means_.index_select(0, idx) + at::matmul(cholesky_.index_select(0, idx), z).squeeze(-1);
  return x.to(dtype);
}

namespace {

// The mixture's tensors stay on the CPU (a closed-form reference, small and in float64): an input on
// another device is evaluated there and the result moved back, differentiably (docs/devices.md).
template <typename F>
Tensor on_cpu(const Tensor& x, F f) {
  if (x.device().is_cpu()) return f(x);
  return f(x.cpu()).to(x.device());
}

}  // namespace

Tensor GaussianMixture::log_prob(const Tensor& x_in) const {
  return on_cpu(x_in, [&](const Tensor& x) {
    const auto one = at::ones({}, x.options());
    return evaluate(x, one, one * 0.0).log_p;
  });
}

Tensor GaussianMixture::score(const Tensor& x_in) const {
  return on_cpu(x_in, [&](const Tensor& x) {
    const auto one = at::ones({}, x.options());
    return marginal_score(x, {one, one * 0.0, one * 0.0, one * 0.0});
  });
}

Tensor GaussianMixture::mean() const { return (weights_.unsqueeze(1) * means_).sum(0); }

Tensor GaussianMixture::covariance() const {
  const Tensor m = mean();
  const Tensor centred = means_ - m;
  return (weights_.reshape({-1, 1, 1}) *
          (covariances_ + centred.unsqueeze(2) * centred.unsqueeze(1))).sum(0);
}

Tensor GaussianMixture::velocity(const Tensor& x, const ScheduleTensors& s) const {
  if (fused_applies(diagonal_, x, s, Tensor())) {
    check_batch(x, dim(), "x");
    Tensor v;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gmm_velocity", [&] {
      fused_rows<scalar_t>(x, Tensor(), means_, eigenvalues_, diagonal_ ? Tensor() : eigenvectors_, log_weights_,
                           s.alpha.item<double>(), s.beta.item<double>(), s.d_alpha.item<double>(),
                           s.d_beta.item<double>(), &v, nullptr);
    });
    return v;
  }
  const Parts p = evaluate(x, s.alpha, s.beta);
  const auto dt = x.scalar_type();
  const Tensor a = bcast(s.alpha.to(dt)), b = bcast(s.beta.to(dt));
  const Tensor da = bcast(s.d_alpha.to(dt)), db = bcast(s.d_beta.to(dt));
  const Tensor lam = eigenvalues_.to(dt).unsqueeze(1);
  // (alpha' alpha Sigma + beta' beta I) C^{-1} in the eigenbasis of Sigma_k.
  const Tensor coef = (da * a * lam + db * b) / p.var;                      // [K, B, d]
  const Tensor lin = diagonal_ ? coef * p.y : at::bmm(coef * p.y, p.U.transpose(1, 2));
  const Tensor v_k = da * p.mu.unsqueeze(1) + lin;                          // [K, B, d]
  return (at::exp(p.log_post).unsqueeze(-1) * v_k).sum(0);
}

Tensor GaussianMixture::velocity_vjp(const Tensor& x, const ScheduleTensors& s, const Tensor& a,
                                     Tensor* v_out) const {
  // With gamma_k the posterior weights, N_k = N(x; alpha mu_k, C_k), z_k = C_k^{-1} (x - alpha mu_k)
  // (so grad log N_k = -z_k) and M_k = dv_k/dx = (alpha' alpha Sigma_k + beta' beta I) C_k^{-1}
  // (symmetric), differentiating v = sum_k gamma_k v_k with grad gamma_k = gamma_k (zbar - z_k) gives
  //   (dv/dx)^T a = sum_k gamma_k [ M_k a - (a.v_k - a.v) z_k ],
  // evaluated in each component's eigenbasis and rotated back once.
  check_batch(a, dim(), "adjoint");
  if (fused_applies(diagonal_, x, s, a)) {
    check_batch(x, dim(), "x");
    Tensor g, v;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gmm_velocity_vjp", [&] {
      fused_rows<scalar_t>(x, a, means_, eigenvalues_, diagonal_ ? Tensor() : eigenvectors_, log_weights_,
                           s.alpha.item<double>(), s.beta.item<double>(), s.d_alpha.item<double>(),
                           s.d_beta.item<double>(), v_out ? &v : nullptr, &g);
    });
    if (v_out) *v_out = v;
    return g;
  }
  const Parts p = evaluate(x, s.alpha, s.beta);
  const auto dt = x.scalar_type();
  const Tensor al = bcast(s.alpha.to(dt)), be = bcast(s.beta.to(dt));
  const Tensor da = bcast(s.d_alpha.to(dt)), db = bcast(s.d_beta.to(dt));
  const Tensor lam = eigenvalues_.to(dt).unsqueeze(1);
  const Tensor coef = (da * al * lam + db * be) / p.var;                    // M_k's eigenvalues, [K, B, d]
  const Tensor a_rot = diagonal_ ? a.to(dt).unsqueeze(0) : at::matmul(a.to(dt).unsqueeze(0), p.U);  // U_k^T a
  const Tensor gamma = at::exp(p.log_post);                                 // [K, B]
  const Tensor cy = coef * p.y;
  // a . v_k = a . (alpha' mu_k) + (U_k^T a) . (coef_k y_k): no rotation of v_k needed.
  const Tensor a_vk = (da * p.mu.unsqueeze(1) * a.to(dt).unsqueeze(0) + a_rot * cy).sum(-1);  // [K, B]
  const Tensor a_v = (gamma * a_vk).sum(0, /*keepdim=*/true);                                   // [1, B]
  const Tensor inner = gamma.unsqueeze(-1) * (coef * a_rot - (a_vk - a_v).unsqueeze(-1) * (p.y / p.var));
  if (v_out) {
    const Tensor lin = diagonal_ ? cy : at::bmm(cy, p.U.transpose(1, 2));
    *v_out = (gamma.unsqueeze(-1) * (da * p.mu.unsqueeze(1) + lin)).sum(0).detach();
  }
  return diagonal_ ? inner.sum(0) : at::bmm(inner, p.U.transpose(1, 2)).sum(0);
}

Tensor GaussianMixture::marginal_score(const Tensor& x, const ScheduleTensors& s) const {
  const Parts p = evaluate(x, s.alpha, s.beta);
  const Tensor z = p.y / p.var;
  const Tensor s_k = diagonal_ ? -z : -at::bmm(z, p.U.transpose(1, 2));      // [K, B, d]
  return (at::exp(p.log_post).unsqueeze(-1) * s_k).sum(0);
}

GaussianMixture GaussianMixture::tilt_linear(const Tensor& a_in, double* log_z) const {
  const Tensor a = as_double(a_in, "linear tilt a");
  if (a.dim() != 1 || a.size(0) != dim()) {
    throw Error("linear tilt: a must be [" + std::to_string(dim()) + "], got " + shape_string(a));
  }
  const Tensor Sa = at::matmul(covariances_, a);                              // [K, d]
  const Tensor log_c = at::matmul(means_, a) + 0.5 * (Sa * a).sum(-1);         // [K]
  const Tensor log_w = at::log(weights_) + log_c;
  if (log_z) *log_z = at::logsumexp(log_w, {0}).item<double>();
  return from_log_weights(log_w, means_ + Sa, covariances_);
}

GaussianMixture GaussianMixture::tilt_quadratic(const Tensor& c_in, const Tensor& A_in,
                                                double* log_z) const {
  const Tensor c = as_double(c_in, "quadratic tilt centre");
  const Tensor A = symmetrise(as_double(A_in, "quadratic tilt matrix"));
  const int64_t d = dim();
  if (c.dim() != 1 || c.size(0) != d) {
    throw Error("quadratic tilt: centre must be [" + std::to_string(d) + "], got " + shape_string(c));
  }
  if (A.dim() != 2 || A.size(0) != d || A.size(1) != d) {
    throw Error("quadratic tilt: matrix must be [" + std::to_string(d) + ", " + std::to_string(d) +
                "], got " + shape_string(A));
  }
  // p_k(x) exp(-(x - c)^T A (x - c) / 2) has a finite integral only where the precision Sigma_k^{-1} + A is
  // positive definite (A may be indefinite: a negative lambda pushes mass away from c).
  const Tensor precision = at::cholesky_inverse(cholesky_) + A.unsqueeze(0);  // [K, d, d]
  const Tensor lowest = std::get<0>(at::linalg_eigh(symmetrise(precision))).select(-1, 0);  // [K]
  const int64_t worst = lowest.argmin().item<int64_t>();
  if (!(lowest[worst].item<double>() > 0)) {
    throw Error("quadratic tilt: p(x) exp(-(x - c)^T A (x - c) / 2) has no finite integral: Sigma_k^{-1} + A is not "
                "positive definite for component " + std::to_string(worst) + " (smallest eigenvalue " +
                std::to_string(lowest[worst].item<double>()) + "); A's smallest eigenvalue must exceed -1 / (that "
                "component's largest variance)");
  }
  const Tensor eye = at::eye(d, at::kDouble);
  const Tensor M = eye.unsqueeze(0) + at::matmul(covariances_, A);             // I + Sigma A, [K, d, d]
  const Tensor cov = symmetrise(at::linalg_solve(M, covariances_));
  const Tensor rhs = means_ + at::matmul(at::matmul(covariances_, A), c);      // mu + Sigma A c
  const Tensor mean = at::linalg_solve(M, rhs.unsqueeze(-1)).squeeze(-1);
  const Tensor r = means_ - c;
  const Tensor Minv_r = at::linalg_solve(M, r.unsqueeze(-1)).squeeze(-1);
  const Tensor quad = (r * at::matmul(Minv_r, A)).sum(-1);                     // r^T A M^{-1} r
  const Tensor log_c = -0.5 * std::get<1>(at::linalg_slogdet(M)) - 0.5 * quad;
  const Tensor log_w = at::log(weights_) + log_c;
  if (log_z) *log_z = at::logsumexp(log_w, {0}).item<double>();
  return from_log_weights(log_w, mean, cov);
}

GaussianMixture GaussianMixture::product(const GaussianMixture& q, double* log_z) const {
  if (q.dim() != dim()) {
    throw Error("mixture product: dimensions differ (" + std::to_string(dim()) + " vs " +
                std::to_string(q.dim()) + ")");
  }
  const int64_t K1 = components(), K2 = q.components(), d = dim();
  // All pairs (i, j): S = Sigma1_i + Sigma2_j.
  const Tensor S1 = covariances_.unsqueeze(1).expand({K1, K2, d, d});
  const Tensor S2 = q.covariances_.unsqueeze(0).expand({K1, K2, d, d});
  const Tensor m1 = means_.unsqueeze(1).expand({K1, K2, d});
  const Tensor m2 = q.means_.unsqueeze(0).expand({K1, K2, d});
  const Tensor S = S1 + S2;
  // Sigma_c = Sigma1 S^{-1} Sigma2, mu_c = Sigma2 S^{-1} mu1 + Sigma1 S^{-1} mu2.
  const Tensor cov = symmetrise(at::matmul(S1, at::linalg_solve(S, S2)));
  const Tensor mean = at::matmul(S2, at::linalg_solve(S, m1.unsqueeze(-1))).squeeze(-1) +
                      at::matmul(S1, at::linalg_solve(S, m2.unsqueeze(-1))).squeeze(-1);
  const Tensor r = m1 - m2;
  const Tensor quad = (r * at::linalg_solve(S, r.unsqueeze(-1)).squeeze(-1)).sum(-1);
  const Tensor log_n = -0.5 * quad - 0.5 * std::get<1>(at::linalg_slogdet(S)) -
                       0.5 * static_cast<double>(d) * kLog2Pi;               // log N(mu1; mu2, S)
  const Tensor log_w = (at::log(weights_).unsqueeze(1) + at::log(q.weights_).unsqueeze(0) + log_n).reshape({-1});
  if (log_z) *log_z = at::logsumexp(log_w, {0}).item<double>();
  return from_log_weights(log_w, mean.reshape({K1 * K2, d}), cov.reshape({K1 * K2, d, d}));
}

GmmVelocity::GmmVelocity(std::shared_ptr<const GaussianMixture> mixture, SchedulePtr schedule)
    : VelocityField(std::move(schedule)), mixture_(std::move(mixture)) {
  if (!mixture_) throw Error("GmmVelocity: no mixture given");
}

VelocityFieldPtr GmmVelocity::clone() const { return std::make_shared<GmmVelocity>(mixture_, schedule()); }

Tensor GmmVelocity::velocity(const Tensor& x, const Tensor& t) const {
  check_batch(x, dim(), "x");
  check_time(t, x.size(0), "t");
  return on_cpu(x, [&](const Tensor& xc) { return mixture_->velocity(xc, schedule()->at(t.to(at::kCPU, x.scalar_type()))); });
}

Tensor GmmVelocity::vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out) const {
  check_batch(x, dim(), "x");
  if (!x.device().is_cpu()) {
    const Tensor g = vjp(x.cpu(), t, a.cpu(), v_out);
    if (v_out) *v_out = v_out->to(x.device());
    return g.to(x.device());
  }
  return mixture_->velocity_vjp(x, schedule()->at(at::scalar_tensor(t, x.options())), a, v_out);
}

std::optional<GaussianMixture> exact_tilt(const Reward& reward, const GaussianMixture& base, double lambda,
                                          double* log_z) {
  if (!std::isfinite(lambda)) throw Error("exact tilt: lambda must be finite, got " + number_string(lambda));
  const auto* closed_form = dynamic_cast<const MixtureTilt*>(&reward);
  if (!closed_form) return std::nullopt;
  return closed_form->tilt(base, lambda, log_z);
}

}  // namespace tilt
