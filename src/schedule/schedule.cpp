// Schedules (docs/equations.md, E1-E4, E6, E11). Each schedule's formulas are written once as a template over the
// time type, so the double and the tensor versions cannot drift apart.
#include "tilt/schedule/schedule.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <cmath>

namespace tilt {
namespace {

constexpr double kPi = 3.14159265358979323846;

template <class T>
struct Values {
  T alpha, beta, d_alpha, d_beta;
};

ScheduleValues to_values(const Values<double>& v) { return {v.alpha, v.beta, v.d_alpha, v.d_beta}; }
ScheduleTensors to_tensors(const Values<Tensor>& v) {
  return {v.alpha, v.beta, v.d_alpha, v.d_beta};
}

struct LinearFormulas {
  template <class T>
  Values<T> operator()(const T& t) const {
    return {t, 1.0 - t, t * 0.0 + 1.0, t * 0.0 - 1.0};
  }
};

struct CosineFormulas {
  template <class T>
  Values<T> operator()(const T& t) const {
    using std::cos;
    using std::sin;
    const T theta = t * (kPi / 2.0);
    return {sin(theta), cos(theta), cos(theta) * (kPi / 2.0), sin(theta) * (-kPi / 2.0)};
  }
};

struct VpFormulas {
  double beta_min, beta_max;
  // abar(t) = exp(-(beta_min s + (beta_max - beta_min) s^2 / 2)), s = 1 - t, so
  // d abar / dt = abar (beta_min + (beta_max - beta_min) s).
  template <class T>
  Values<T> operator()(const T& t) const {
    using std::exp;
    using std::sqrt;
    const T s = 1.0 - t;
    const T abar = exp((s * beta_min + s * s * (0.5 * (beta_max - beta_min))) * -1.0);
    const T d_abar = abar * (s * (beta_max - beta_min) + beta_min);
    const T alpha = sqrt(abar);
    const T beta = sqrt(1.0 - abar);
    return {alpha, beta, d_abar / (alpha * 2.0), d_abar / (beta * -2.0)};
  }
};

template <class F>
class FormulaSchedule : public Schedule {
 public:
  FormulaSchedule(std::string name, F f) : name_(std::move(name)), f_(f) {}
  std::string name() const override { return name_; }
  ScheduleValues at(double t) const override { return to_values(f_(t)); }
  ScheduleTensors at(const Tensor& t) const override { return to_tensors(f_(t)); }

 protected:
  std::string name_;
  F f_;
};

class VpSchedule : public FormulaSchedule<VpFormulas> {
 public:
  using FormulaSchedule::FormulaSchedule;
  std::vector<std::pair<std::string, double>> parameters() const override {
    return {{"beta_min", f_.beta_min}, {"beta_max", f_.beta_max}};
  }
  // alpha_0 > 0: nothing to regularise (see the header).
  double kappa_h(double t, double) const override { return kappa(t); }
  double eta_h(double t, double) const override { return eta(t); }
  double inverse_eta_h(double t, double) const override { return Schedule::inverse_eta_h(t, 0.0); }
  double kappa_over_eta_h(double t, double) const override {
    return Schedule::kappa_over_eta_h(t, 0.0);
  }
};

}  // namespace

double Schedule::kappa(double t) const {
  const ScheduleValues s = at(t);
  return s.d_alpha / s.alpha;
}

double Schedule::eta(double t) const {
  const ScheduleValues s = at(t);
  return s.beta * (s.d_alpha / s.alpha * s.beta - s.d_beta);
}

double Schedule::kappa_h(double t, double h) const {
  const ScheduleValues s = at(t);
  return s.d_alpha / (s.alpha + h * s.d_alpha);
}

double Schedule::eta_h(double t, double h) const { return 1.0 / inverse_eta_h(t, h); }

double Schedule::inverse_eta_h(double t, double h) const {
  // eta = W beta / alpha with W = alpha' beta - alpha beta'; offset alpha and beta in the ratio.
  const ScheduleValues s = at(t);
  const double wronskian = s.d_alpha * s.beta - s.alpha * s.d_beta;
  return (s.alpha + h * s.d_alpha) / (wronskian * (s.beta + h * std::abs(s.d_beta)));
}

double Schedule::kappa_over_eta_h(double t, double h) const {
  const ScheduleValues s = at(t);
  const double wronskian = s.d_alpha * s.beta - s.alpha * s.d_beta;
  return s.d_alpha / (wronskian * (s.beta + h * std::abs(s.d_beta)));
}

SchedulePtr make_linear_schedule() {
  return std::make_shared<FormulaSchedule<LinearFormulas>>("linear", LinearFormulas{});
}

SchedulePtr make_cosine_schedule() {
  return std::make_shared<FormulaSchedule<CosineFormulas>>("cosine", CosineFormulas{});
}

SchedulePtr make_vp_schedule(double beta_min, double beta_max) {
  if (!(beta_min > 0.0) || !(beta_max > beta_min)) {
    throw Error("vp schedule needs 0 < beta_min < beta_max, got beta_min = " +
                std::to_string(beta_min) + ", beta_max = " + std::to_string(beta_max));
  }
  return std::make_shared<VpSchedule>("vp", VpFormulas{beta_min, beta_max});
}

SchedulePtr make_schedule(const std::string& name, const std::vector<std::pair<std::string, double>>& parameters) {
  const bool vp = name == "vp";
  double beta_min = 0.1, beta_max = 20.0;
  for (const auto& [key, value] : parameters) {
    if (vp && key == "beta_min") {
      beta_min = value;
    } else if (vp && key == "beta_max") {
      beta_max = value;
    } else {
      throw Error("schedule '" + name + "' has no parameter '" + key + "'" +
                  (vp ? " (vp takes beta_min, beta_max)" : " (it takes none)"));
    }
  }
  if (name == "linear") return make_linear_schedule();
  if (name == "cosine") return make_cosine_schedule();
  if (vp) return make_vp_schedule(beta_min, beta_max);
  throw Error("unknown schedule '" + name + "' (valid: linear, cosine, vp)");
}

}  // namespace tilt
