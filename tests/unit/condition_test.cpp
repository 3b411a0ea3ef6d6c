// Conditions (docs/conditions.md): the conditional mixture's field and its VJP against the shifted
// mixture and finite differences, the conditional tilt against importance sampling, binding and guidance,
// the conditional MLP, and Adjoint Matching over a set of training conditions.
#include "tilt/core/error.h"
#include "tilt/model/classifier.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/mlp.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/adjoint_matching.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

std::shared_ptr<ConditionalGmmVelocity> conditional_mixture(int64_t d, int64_t dc, uint64_t seed,
                                                            SchedulePtr schedule = make_linear_schedule()) {
  Generator gen = make_generator(seed);
  const at::Tensor M = at::randn({d, dc}, gen, kDouble);
  return std::make_shared<ConditionalGmmVelocity>(test::random_mixture(d, 3, seed), M, std::move(schedule));
}

TEST(ConditionalMixture, VelocityIsTheShiftedMixtureFieldRowByRow) {
  for (const auto& schedule : {make_linear_schedule(), make_cosine_schedule(), make_vp_schedule()}) {
    const auto field = conditional_mixture(3, 2, 5, schedule);
    Generator gen = make_generator(2);
    const at::Tensor x = 2.0 * at::randn({5, 3}, gen, kDouble);
    const at::Tensor c = at::randn({5, 2}, gen, kDouble);
    for (double t : {0.0, 0.3, 0.8, 0.99}) {  // vp: alpha' is infinite at t = 1
      const at::Tensor v = field->conditional_velocity(x, at::scalar_tensor(t, kDouble), c);
      for (int64_t b = 0; b < 5; ++b) {
        // The same row through an independent, unconditional mixture: p_0 with its means moved by M c_b.
        const GmmVelocity at_c(std::make_shared<GaussianMixture>(field->mixture_at(c[b])), schedule);
        const at::Tensor expected = at_c.velocity(x.narrow(0, b, 1), t);
        EXPECT_LT((v.narrow(0, b, 1) - expected).abs().max().item<double>(), 1e-10) << schedule->name() << " t=" << t;
      }
    }
  }
}

TEST(ConditionalMixture, VjpMatchesFiniteDifferences) {
  const auto field = conditional_mixture(4, 3, 8);
  Generator gen = make_generator(3);
  const at::Tensor x = at::randn({4, 4}, gen, kDouble);
  const at::Tensor c = at::randn({4, 3}, gen, kDouble);
  const at::Tensor a = at::randn({4, 4}, gen, kDouble);
  for (double t : {0.05, 0.5, 0.95}) {
    const auto f = [&](const at::Tensor& y) { return field->conditional_velocity(y, at::scalar_tensor(t, kDouble), c); };
    const at::Tensor J = test::fd_jacobian(f, x);  // [B, d, d], J[b, i, j] = dv_i / dx_j
    const at::Tensor expected = at::matmul(J.transpose(1, 2), a.unsqueeze(2)).squeeze(2);
    at::Tensor v;
    const at::Tensor g = field->conditional_vjp(x, t, c, a, &v);
    EXPECT_LT((g - expected).abs().max().item<double>(), 1e-6 * (1 + expected.abs().max().item<double>())) << t;
    EXPECT_LT((v - f(x)).abs().max().item<double>(), 1e-12);
    // The bound field's VJP (what the lean adjoint calls) is the same.
    const at::Tensor g_bound = bind_condition(field, c)->vjp(x, t, a);
    EXPECT_LT((g_bound - g).abs().max().item<double>(), 1e-12);
  }
}

TEST(ConditionalMixture, NullConditionIsAnErrorUnlessGiven) {
  const auto field = conditional_mixture(2, 1, 4);
  const at::Tensor x = at::zeros({3, 2}, kDouble);
  EXPECT_THROW(field->velocity(x, 0.5), Error);
  const ConditionSet set(at::tensor({-1.0, 1.0}, kDouble).reshape({2, 1}));
  const auto marginal = std::make_shared<GaussianMixture>(field->marginal(set));
  EXPECT_EQ(marginal->components(), 2 * field->mixture().components());
  ConditionalGmmVelocity with_null(std::make_shared<GaussianMixture>(field->mixture()), field->shift(),
                                   field->schedule(), marginal);
  EXPECT_LT((with_null.velocity(x, 0.5) - GmmVelocity(marginal, field->schedule()).velocity(x, 0.5)).abs().max().item<double>(),
            1e-12);
  // Bad conditions name what is wrong.
  EXPECT_THROW(field->conditional_velocity(x, at::scalar_tensor(0.5, kDouble), at::zeros({3, 2}, kDouble)), Error);
  EXPECT_THROW(field->conditional_velocity(x, at::scalar_tensor(0.5, kDouble), at::zeros({2, 1}, kDouble)), Error);
}

// Self-normalised importance sampling of p*(. | c) with samples of p_base(. | c) drawn by translating
// p_0's samples (not through mixture_at), weighted by exp(lambda r(x, c)) from conditional_value.
void expect_tilt_matches_importance(const ConditionalGmmVelocity& base, const Reward& reward, const at::Tensor& c,
                                    double lambda) {
  Generator gen = make_generator(11);
  const int64_t n = 1000000;
  const at::Tensor x = base.mixture().sample(n, gen, at::kDouble) + at::matmul(c.reshape({1, -1}), base.shift().t());
  const at::Tensor logw = lambda * reward.conditional_value(x, c.reshape({1, -1}));
  const at::Tensor w = at::softmax(logw, 0).unsqueeze(1);
  const double log_z_is = (at::logsumexp(logw, {0}) - std::log(static_cast<double>(n))).item<double>();
  double log_z = 0;
  const auto tilted = exact_conditional_tilt(base, reward, c, lambda, &log_z);
  ASSERT_TRUE(tilted.has_value());
  EXPECT_LT((tilted->mean() - (w * x).sum(0)).abs().max().item<double>(), 0.03);
  const at::Tensor second = tilted->covariance() + at::outer(tilted->mean(), tilted->mean());
  EXPECT_LT((second - at::matmul((w * x).t(), x)).abs().max().item<double>(), 0.08);
  EXPECT_NEAR(log_z, log_z_is, 0.03);
}

TEST(ConditionalTilt, MatchesImportanceSamplingAtSeveralConditions) {
  const auto base = conditional_mixture(3, 2, 9);
  const ConditionalQuadraticReward quadratic(at::tensor({0.5, -0.5, 1.0}, kDouble),
                                             at::tensor({1.0, 0.0, -0.5, 0.5, 0.0, 1.0}, kDouble).reshape({3, 2}),
                                             at::diag(at::tensor({0.8, 0.4, 0.6}, kDouble)));
  const ConditionalLinearReward linear(at::tensor({0.3, 0.0, -0.2}, kDouble),
                                       at::tensor({0.2, -0.1, 0.0, 0.3, 0.1, 0.0}, kDouble).reshape({3, 2}));
  for (const auto& c : {at::tensor({0.0, 0.0}, kDouble), at::tensor({1.0, -0.5}, kDouble), at::tensor({-2.0, 1.5}, kDouble)}) {
    expect_tilt_matches_importance(*base, quadratic, c, 1.0);
    expect_tilt_matches_importance(*base, linear, c, 1.5);
  }
}

TEST(ConditionalRewards, GradientsMatchFiniteDifferencesAndTheFixedConditionReward) {
  Generator gen = make_generator(4);
  const ConditionalQuadraticReward quadratic(at::randn({3}, gen, kDouble), at::randn({3, 2}, gen, kDouble),
                                             at::eye(3, kDouble) * 0.7);
  const ConditionalLinearReward linear(at::randn({3}, gen, kDouble), at::randn({3, 2}, gen, kDouble));
  const at::Tensor x = at::randn({5, 3}, gen, kDouble);
  const at::Tensor c = at::randn({5, 2}, gen, kDouble);
  for (const Reward* r : {static_cast<const Reward*>(&quadratic), static_cast<const Reward*>(&linear)}) {
    const at::Tensor g = r->conditional_grad(x, c);
    at::Tensor fd = at::zeros_like(x);
    for (int64_t j = 0; j < 3; ++j) {
      at::Tensor e = at::zeros_like(x);
      e.select(1, j).fill_(1e-6);
      fd.select(1, j).copy_((r->conditional_value(x + e, c) - r->conditional_value(x - e, c)) / 2e-6);
    }
    EXPECT_LT((g - fd).abs().max().item<double>(), 1e-6) << r->kind();
    EXPECT_THROW(r->value(x), Error) << r->kind();  // no null condition
    const auto* moving = dynamic_cast<const ConditionalMixtureTilt*>(r);
    ASSERT_NE(moving, nullptr);
    for (int64_t b = 0; b < 5; ++b) {
      EXPECT_NEAR(moving->at(c[b])->value(x.narrow(0, b, 1)).item<double>(),
                  r->conditional_value(x.narrow(0, b, 1), c.narrow(0, b, 1)).item<double>(), 1e-12);
    }
  }
}

// r(x, c) = c . log p(. | x): at a class's one-hot row, the fixed-class reward log p(k | x), value and gradient.
TEST(ConditionalRewards, ClassifierRewardOfEachRowsOwnClass) {
  ClassifierOptions o;
  o.dim = 6;
  o.hidden = {12};
  o.classes = 4;
  const auto classifier = std::make_shared<const MlpClassifier>(o, 3);
  const ConditionalClassifierReward reward(classifier);
  EXPECT_EQ(reward.condition_dim(), 4);
  Generator gen = make_generator(2);
  const at::Tensor x = at::randn({8, 6}, gen);
  const at::Tensor labels = at::arange(8, at::kLong).remainder(4);
  const at::Tensor c = at::one_hot(labels, 4).to(at::kFloat);
  const at::Tensor r = reward.conditional_value(x, c), g = reward.conditional_grad(x, c);
  for (int64_t b = 0; b < 8; ++b) {
    const ClassifierReward fixed(classifier, labels[b].item<int64_t>());
    EXPECT_NEAR(r[b].item<float>(), fixed.value(x.narrow(0, b, 1))[0].item<float>(), 1e-6);
    EXPECT_LT((g[b] - fixed.grad(x.narrow(0, b, 1))[0]).abs().max().item<float>(), 1e-6);
  }
  EXPECT_THROW(reward.value(x), Error);
  // The indicator of each row's own class.
  const ConditionalClassifierReward indicator(classifier, ClassifierForm::indicator);
  const at::Tensor hit = indicator.conditional_value(x, c);
  EXPECT_TRUE(hit.eq(classifier->log_probs(x).argmax(1).eq(labels).to(at::kFloat)).all().item<bool>());
  EXPECT_THROW(indicator.conditional_grad(x, c), Error);
}

TEST(Conditions, BindingAndGuidance) {
  const auto field = conditional_mixture(2, 1, 6);
  const ConditionSet set(at::tensor({-1.0, 1.0}, kDouble).reshape({2, 1}));
  auto guided_base = std::make_shared<ConditionalGmmVelocity>(std::make_shared<GaussianMixture>(field->mixture()),
                                                              field->shift(), field->schedule(),
                                                              std::make_shared<GaussianMixture>(field->marginal(set)));
  Generator gen = make_generator(5);
  const at::Tensor x = at::randn({4, 2}, gen, kDouble), a = at::randn({4, 2}, gen, kDouble);
  const at::Tensor c = at::full({1, 1}, 0.7, kDouble);
  const double w = 2.5;
  const auto guided = bind_condition(guided_base, c, w);
  EXPECT_EQ(guided->condition_dim(), 0);
  const at::Tensor v_c = guided_base->conditional_velocity(x, at::scalar_tensor(0.4, kDouble), c);
  const at::Tensor v_null = guided_base->velocity(x, 0.4);
  EXPECT_LT((guided->velocity(x, 0.4) - ((1 + w) * v_c - w * v_null)).abs().max().item<double>(), 1e-12);
  // The guided VJP by hand against autograd through the guided velocity.
  at::Tensor v_out;
  const at::Tensor g = guided->vjp(x, 0.4, a, &v_out);
  EXPECT_LT((g - guided->VelocityField::vjp(x, 0.4, a)).abs().max().item<double>(), 1e-10);
  EXPECT_LT((v_out - guided->velocity(x, 0.4)).abs().max().item<double>(), 1e-12);
  // What is refused, by name.
  const auto plain = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  EXPECT_THROW(bind_condition(plain, c), Error);
  EXPECT_EQ(bind_condition(plain, at::Tensor()), plain);
  EXPECT_THROW(bind_condition(guided_base, at::Tensor(), 1.0), Error);
  EXPECT_THROW(bind_condition(guided_base, c, NAN), Error);
  EXPECT_THROW(bind_condition(guided_base, at::zeros({1, 2}, kDouble)), Error);
}

// Guided Gaussians with one covariance stay Gaussian: the velocity of N(mu, Sigma) is affine in mu, so
// (1 + w) v(. | c) - w v(. | null) is the velocity of N((1 + w) mu_c - w mu_null, Sigma) (docs/equations.md,
// E97). Samples of the guided field, by the ODE and by the memoryless SDE, must have that mean and covariance.
TEST(Conditions, GuidedGaussiansSampleTheirClosedForm) {
  const at::Tensor Sigma = at::tensor({0.5, 0.2, 0.2, 0.3}, kDouble).reshape({2, 2});
  const auto p0 = std::make_shared<GaussianMixture>(at::ones({1}, kDouble), at::zeros({1, 2}, kDouble), Sigma.unsqueeze(0));
  const at::Tensor mu_null = at::tensor({0.5, -0.5}, kDouble);
  const auto null = std::make_shared<GaussianMixture>(at::ones({1}, kDouble), mu_null.reshape({1, 2}), Sigma.unsqueeze(0));
  const at::Tensor M = at::tensor({1.0, 0.5}, kDouble).reshape({2, 1});
  const auto field = std::make_shared<ConditionalGmmVelocity>(p0, M, make_linear_schedule(), null);
  const double w = 1.5;
  const at::Tensor c = at::full({1, 1}, 0.8);
  const at::Tensor mu_w = (1 + w) * at::matmul(M, c.to(at::kDouble).reshape({1, 1})).reshape({2}) - w * mu_null;
  for (const bool ode : {true, false}) {
    const GenerativeSDE sde(bind_condition(field, c, w), ode ? make_zero_noise() : make_memoryless_noise(1.0 / 200));
    SampleOptions opts;
    opts.integrator = ode ? Integrator::heun : Integrator::euler;
    Generator gen = make_generator(9);
    const at::Tensor x = sample(sde, 40000, TimeGrid::uniform(200), gen, opts, at::kDouble);
    const at::Tensor mean = x.mean(0), centred = x - mean;
    const at::Tensor cov = at::matmul(centred.t(), centred) / static_cast<double>(x.size(0));
    EXPECT_LT((mean - mu_w).abs().max().item<double>(), 0.03) << (ode ? "ODE" : "SDE") << " mean " << mean;
    EXPECT_LT((cov - Sigma).abs().max().item<double>(), 0.03) << (ode ? "ODE" : "SDE") << " covariance " << cov;
  }
}

TEST(Conditions, SetDrawsItsRowsAndRefusesBadTables) {
  const ConditionSet set(at::tensor({0.0, 1.0, 2.0, 3.0, 4.0, 5.0}, kDouble).reshape({3, 2}));
  Generator gen = make_generator(1);
  const at::Tensor drawn = set.draw(300, gen, at::kDouble);
  ASSERT_EQ(drawn.sizes(), (at::IntArrayRef{300, 2}));
  EXPECT_TRUE(at::allclose(drawn.select(1, 1), drawn.select(1, 0) + 1.0));
  const at::Tensor firsts = drawn.select(1, 0);
  for (double v : {0.0, 2.0, 4.0}) EXPECT_GT(firsts.eq(v).sum().item<int64_t>(), 60) << v;
  EXPECT_TRUE(at::equal(ConditionSet::classes(3).values(), at::eye(3, kDouble)));
  EXPECT_THROW(ConditionSet(at::zeros({0, 2}, kDouble)), Error);
  EXPECT_THROW(ConditionSet(at::zeros({3}, kDouble)), Error);
  EXPECT_THROW(ConditionSet(at::full({2, 1}, NAN, kDouble)), Error);
  EXPECT_THROW(ConditionSet::classes(0), Error);
  // A uniform box: draws inside it, spread over it; contains() by the box, not by its corners.
  const ConditionSet box = ConditionSet::uniform(at::tensor({-1.0, 0.0}, kDouble), at::tensor({1.0, 0.5}, kDouble));
  EXPECT_TRUE(box.is_box());
  const at::Tensor u = box.draw(4000, gen, at::kDouble);
  EXPECT_TRUE((u.select(1, 0) >= -1).all().item<bool>() && (u.select(1, 0) <= 1).all().item<bool>());
  EXPECT_TRUE((u.select(1, 1) >= 0).all().item<bool>() && (u.select(1, 1) <= 0.5).all().item<bool>());
  EXPECT_NEAR(u.select(1, 0).mean().item<double>(), 0.0, 0.05);
  EXPECT_NEAR(u.select(1, 1).var().item<double>(), 0.25 / 12, 0.003);
  EXPECT_TRUE(box.contains(at::tensor({0.3, 0.2}, kDouble)));
  EXPECT_FALSE(box.contains(at::tensor({0.3, 0.7}, kDouble)));
  EXPECT_TRUE(set.contains(at::tensor({2.0, 3.0}, kDouble)));
  EXPECT_FALSE(set.contains(at::tensor({2.0, 3.5}, kDouble)));
  EXPECT_THROW(ConditionSet::uniform(at::tensor({1.0}, kDouble), at::tensor({0.0}, kDouble)), Error);
  EXPECT_THROW(ConditionSet::uniform(at::tensor({1.0}, kDouble), at::tensor({2.0, 3.0}, kDouble)), Error);
  const auto shared = std::make_shared<const ConditionSet>(set);
  EXPECT_THROW(check_conditions(shared, 0, "test"), Error);
  EXPECT_THROW(check_conditions(nullptr, 2, "test"), Error);
  EXPECT_THROW(check_conditions(shared, 3, "test"), Error);
  EXPECT_NO_THROW(check_conditions(shared, 2, "test"));
}

TEST(ConditionalMlp, NullConditionIsItsOwnInputAndTheHandVjpStillHolds) {
  MlpOptions o;
  o.dim = 3;
  o.hidden = {16, 16};
  o.time_features = 4;
  o.condition_dim = 2;
  const MlpVelocity net(o, make_linear_schedule(), 3);
  EXPECT_EQ(net.condition_dim(), 2);
  Generator gen = make_generator(7);
  const at::Tensor x = at::randn({5, 3}), a = at::randn({5, 3});
  const at::Tensor c = at::randn({5, 2});
  const at::Tensor t = at::scalar_tensor(0.3);
  const at::Tensor v_null = net.velocity(x, t);
  const at::Tensor v_zero = net.conditional_velocity(x, t, at::zeros({5, 2}));
  // The flag tells c = 0 from the null condition.
  EXPECT_GT((v_null - v_zero).abs().max().item<float>(), 1e-4);
  EXPECT_GT((net.conditional_velocity(x, t, c) - v_zero).abs().max().item<float>(), 1e-4);
  // The hand-written VJP (the taped passes, null condition) against autograd.
  at::Tensor v_out;
  const at::Tensor g = net.vjp(x, 0.3, a, &v_out);
  EXPECT_LT((v_out - v_null).abs().max().item<float>(), 1e-5);
  EXPECT_LT((g - net.VelocityField::vjp(x, 0.3, a)).abs().max().item<float>(), 1e-5);
  // A conditional VJP by autograd against finite differences (double).
  MlpOptions od = o;
  const MlpVelocity netd(od, make_linear_schedule(), 3);
  auto netd64 = std::dynamic_pointer_cast<MlpVelocity>(netd.clone());
  for (auto& p : netd64->named_parameters()) p.second.set_data(p.second.to(at::kDouble));
  const at::Tensor xd = x.to(at::kDouble), cd = c.to(at::kDouble), ad = a.to(at::kDouble);
  const auto f = [&](const at::Tensor& y) { return netd64->conditional_velocity(y, at::scalar_tensor(0.3, kDouble), cd); };
  const at::Tensor J = test::fd_jacobian(f, xd);
  const at::Tensor expected = at::matmul(J.transpose(1, 2), ad.unsqueeze(2)).squeeze(2);
  EXPECT_LT((netd64->conditional_vjp(xd, 0.3, cd, ad) - expected).abs().max().item<double>(), 1e-6);
}

TEST(ConditionalFineTuning, ResidualStartsAtTheBaseAndTakesItsCondition) {
  const auto base = conditional_mixture(2, 1, 12);
  const auto model = make_finetuned(base, FineTuneMode::residual, {32, 32}, 4, 1);
  EXPECT_EQ(model->condition_dim(), 1);
  EXPECT_EQ(model->trainable()->condition_dim(), 1);
  Generator gen = make_generator(8);
  const at::Tensor x = at::randn({6, 2}), c = at::randn({6, 1});
  const at::Tensor t = at::scalar_tensor(0.6);
  EXPECT_LT((model->conditional_velocity(x, t, c) - base->conditional_velocity(x, t, c)).abs().max().item<float>(), 1e-6);
  // An unconditional residual on a conditional base is refused.
  MlpOptions o;
  o.dim = 2;
  o.hidden = {8};
  EXPECT_THROW(FineTunedVelocity(base, std::make_shared<MlpVelocity>(o, base->schedule(), 1), FineTuneMode::residual),
               Error);
}

TEST(ConditionalFineTuning, AdjointMatchingNeedsMatchingConditions) {
  const auto base = conditional_mixture(2, 1, 12);
  const auto model = make_finetuned(base, FineTuneMode::residual, {16}, 4, 1);
  const auto reward = std::make_shared<ConditionalQuadraticReward>(at::zeros({2}, kDouble), at::ones({2, 1}, kDouble),
                                                                   at::eye(2, kDouble));
  AdjointMatchingOptions o;
  o.num_steps = 10;
  o.loss_early_steps = 3;
  o.loss_late_steps = 3;
  const auto noise = make_memoryless_noise(0.1);
  EXPECT_THROW(AdjointMatching(model, reward, noise, o), Error);  // no conditions for a conditional model
  o.conditions = std::make_shared<const ConditionSet>(at::zeros({2, 2}, kDouble));
  EXPECT_THROW(AdjointMatching(model, reward, noise, o), Error);  // wrong size
  o.conditions = std::make_shared<const ConditionSet>(at::tensor({-1.0, 1.0}, kDouble).reshape({2, 1}));
  AdjointMatching am(model, reward, noise, o);
  EXPECT_FALSE(am.taped());
  Generator gen = make_generator(1);
  const LossOutput out = am.compute(gen);
  EXPECT_TRUE(std::isfinite(out.loss.item<double>()));
}

}  // namespace
}  // namespace tilt
