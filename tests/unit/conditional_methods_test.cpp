// Every fine-tuning method over training conditions (docs/conditions.md): DRaFT, ReFL, the discrete
// adjoint, DDPO/GRPO and ODE Adjoint Matching. Each conditional loss and gradient is checked against the
// same method run on the bound, unconditional problem (the base, the residual and the reward bound to
// the conditions the method drew, with the same generator; RAM too), with several different conditions in the
// batch so that a dropped or misaligned c changes the numbers; GRPO's groups are one prompt each; what
// is refused; and a short discrete-adjoint run that moves p(. | c) towards the exact p*(. | c).
#include "tilt/core/error.h"
#include "tilt/eval/conditions.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/engine.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/buffered_adjoint_matching.h"
#include "tilt/train/ode_adjoint_matching.h"
#include "tilt/train/policy_gradient.h"
#include "tilt/train/efficient_adjoint_matching.h"
#include "tilt/train/reinforce_adjoint_matching.h"
#include "tilt/train/reward_baselines.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// A conditional problem (d = 2, dc = 2) with a residual whose parameters are all moved off their start
// (a zero last layer would hide the residual's condition input), and four training conditions.
struct Problem {
  ConditionalProblem problem;
  std::shared_ptr<FineTunedVelocity> model;
  ConditionSetPtr conditions;
};

Problem make_problem(uint64_t seed = 3) {
  Problem s;
  s.problem = random_conditional_problem(2, 2, seed, make_linear_schedule(), 4);
  s.model = make_finetuned(s.problem.base, FineTuneMode::residual, {16, 16}, 4, seed + 1);
  Generator gen = make_generator(seed + 2);
  at::NoGradGuard no_grad;
  for (auto& p : s.model->parameters()) p.add_(0.3 * at::randn(p.sizes(), gen));
  s.conditions = std::make_shared<const ConditionSet>(s.problem.train);
  return s;
}

// The fine-tuned model and the reward at fixed conditions C ([B, dc], one per row, or [1, dc]): ordinary
// unconditional objects whose parameters are the conditional residual's own.
std::shared_ptr<FineTunedVelocity> bound_model(const Problem& s, const Tensor& C) {
  return std::make_shared<FineTunedVelocity>(bind_condition(s.model->base(), C), bind_condition(s.model->trainable(), C),
                                             FineTuneMode::residual);
}
RewardPtr bound_reward(const Problem& s, const Tensor& C) { return bind_condition(s.problem.reward, C); }

struct Result {
  double loss = 0;
  std::vector<Tensor> grads;
  std::vector<std::pair<std::string, double>> metrics;
};

Result run(Loss& loss, Generator& gen) {
  for (auto& p : loss.parameters()) p.mutable_grad() = Tensor();
  LossOutput out = loss.compute(gen);
  out.loss.backward();
  Result r;
  r.loss = out.loss.item<double>();
  for (auto& p : loss.parameters()) r.grads.push_back(p.grad().clone());
  r.metrics = out.metrics;
  return r;
}

double max_grad_difference(const Result& a, const Result& b) {
  double diff = 0;
  for (size_t i = 0; i < a.grads.size(); ++i) diff = std::max(diff, (a.grads[i] - b.grads[i]).abs().max().item<double>());
  return diff;
}

double max_grad(const Result& a) {
  double m = 0;
  for (const auto& g : a.grads) m = std::max(m, g.abs().max().item<double>());
  return m;
}

void expect_same(const Result& got, const Result& expected, const std::string& what) {
  EXPECT_NEAR(got.loss, expected.loss, 1e-5 * (1 + std::abs(expected.loss))) << what;
  ASSERT_EQ(got.grads.size(), expected.grads.size()) << what;
  EXPECT_LT(max_grad_difference(got, expected), 1e-5 * (1 + max_grad(expected))) << what;
  ASSERT_EQ(got.metrics.size(), expected.metrics.size()) << what;
  for (size_t i = 0; i < got.metrics.size(); ++i) {
    EXPECT_NEAR(got.metrics[i].second, expected.metrics[i].second, 1e-5 * (1 + std::abs(expected.metrics[i].second)))
        << what << ": " << got.metrics[i].first;
  }
  EXPECT_GT(max_grad(expected), 1e-4) << what << ": the check must not be vacuous";
}

// The conditional method against the same method on the bound problem. `conditional` builds the method
// with conditions on s.model; `unconditional` builds it on the given model and reward with none. The
// reference draws the method's conditions from its generator first (as the method does), binds them,
// and runs on. It is run again with the drawn conditions' rows permuted, which must differ: the check
// sees a misaligned c.
void expect_bound_equivalence(
    const Problem& s, const std::function<std::unique_ptr<Loss>(ConditionSetPtr)>& conditional,
    const std::function<std::unique_ptr<Loss>(std::shared_ptr<FineTunedVelocity>, RewardPtr)>& unconditional,
    const std::function<Tensor(Generator&)>& draw, const std::string& what) {
  const uint64_t seed = 41;
  Generator gen = make_generator(seed);
  const Result got = run(*conditional(s.conditions), gen);

  Generator ref_gen = make_generator(seed);
  const Tensor C = draw(ref_gen);
  ASSERT_GT(std::get<0>(at::unique_dim(C, 0)).size(0), 1) << what << ": the batch must mix conditions";
  const Result expected = run(*unconditional(bound_model(s, C), bound_reward(s, C)), ref_gen);
  expect_same(got, expected, what);

  Generator perm_gen = make_generator(seed);
  const Tensor C_drawn = draw(perm_gen);
  const Tensor C_rolled = C_drawn.roll(1, 0);
  const Result misaligned = run(*unconditional(bound_model(s, C_rolled), bound_reward(s, C_rolled)), perm_gen);
  EXPECT_GT(max_grad_difference(misaligned, expected), 1e-3 * max_grad(expected)) << what << ": misaligned c";
}

TEST(ConditionalMethods, RewardBaselinesEqualTheBoundProblemRowByRow) {
  const Problem s = make_problem();
  RewardBaselineOptions o;
  o.num_steps = 8;
  o.batch_size = 12;
  o.lambda = 1.3;
  o.draft_k = 3;
  o.refl_t_min = 0.4;
  const auto draw = [&](Generator& gen) { return s.conditions->draw(o.batch_size, gen); };
  const auto noise = make_memoryless_noise(1.0 / 8);
  auto with = [&](ConditionSetPtr c) {
    RewardBaselineOptions oc = o;
    oc.conditions = std::move(c);
    return oc;
  };
  expect_bound_equivalence(
      s, [&](ConditionSetPtr c) { return std::make_unique<DraftK>(s.model, s.problem.reward, with(c)); },
      [&](std::shared_ptr<FineTunedVelocity> m, RewardPtr r) { return std::make_unique<DraftK>(m, r, o); }, draw,
      "DRaFT-K");
  expect_bound_equivalence(
      s, [&](ConditionSetPtr c) { return std::make_unique<Refl>(s.model, s.problem.reward, with(c)); },
      [&](std::shared_ptr<FineTunedVelocity> m, RewardPtr r) { return std::make_unique<Refl>(m, r, o); }, draw, "ReFL");
  expect_bound_equivalence(
      s, [&](ConditionSetPtr c) { return std::make_unique<DiscreteAdjoint>(s.model, s.problem.reward, noise, with(c)); },
      [&](std::shared_ptr<FineTunedVelocity> m, RewardPtr r) { return std::make_unique<DiscreteAdjoint>(m, r, noise, o); },
      draw, "discrete adjoint");
}

// Adjoint Matching stacks the rows of several steps in one regression batch, so its bound reference
// takes one condition for the whole batch ([1, dc] binds any number of rows): for each training condition
// alone, the conditional loss, gradient and metrics equal those of the problem bound to it; and the
// conditions give different gradients (c is not ignored). Both run the autograd path.
TEST(ConditionalMethods, AdjointMatchingEqualsTheBoundProblemAtEachCondition) {
  const Problem s = make_problem();
  AdjointMatchingOptions o;
  o.num_steps = 8;
  o.batch_size = 12;
  o.lambda = 1.3;
  o.loss_early_steps = 3;
  o.loss_late_steps = 3;
  o.clip_factor = 0.0;
  o.tape_activations = false;
  const auto noise = make_memoryless_noise(1.0 / 8);
  std::vector<Result> per_condition;
  for (int64_t i = 0; i < 2; ++i) {
    const Tensor C = s.problem.train.narrow(0, i, 1);
    AdjointMatchingOptions oc = o;
    oc.conditions = std::make_shared<const ConditionSet>(C);
    AdjointMatching conditional(s.model, s.problem.reward, noise, oc);
    Generator gen = make_generator(7);
    const Result got = run(conditional, gen);
    // The reference draws what the method draws first (the condition, from a set of one) and binds it.
    Generator ref_gen = make_generator(7);
    const Tensor drawn = ConditionSet(C).draw(o.batch_size, ref_gen);
    ASSERT_TRUE(at::allclose(drawn, C.to(at::kFloat).expand_as(drawn)));
    AdjointMatching reference(bound_model(s, C.to(at::kFloat)), bound_reward(s, C), noise, o);
    const Result expected = run(reference, ref_gen);
    expect_same(got, expected, "adjoint matching at condition " + std::to_string(i));
    per_condition.push_back(got);
  }
  EXPECT_GT(max_grad_difference(per_condition[0], per_condition[1]), 1e-3 * max_grad(per_condition[0]))
      << "two conditions gave the same gradient: the condition is ignored";
}

// Buffered Adjoint Matching over conditions: a fresh buffer is Adjoint Matching's iteration at the same conditions,
// and after the model moves each trajectory's weights are the density ratio of the model bound to its own c against
// the velocities that drew it (the conditions travel with the rows).
TEST(ConditionalMethods, BufferedAdjointMatchingKeepsEachTrajectorysCondition) {
  Problem s = make_problem();
  AdjointMatchingOptions o;
  o.num_steps = 8;
  o.batch_size = 12;
  o.loss_early_steps = 0;
  o.loss_late_steps = 6;
  o.clip_factor = 0;
  o.conditions = s.conditions;
  const auto noise = make_memoryless_noise(1.0 / o.num_steps);
  AdjointMatching am(s.model, s.problem.reward, noise, o);
  BufferedAdjointMatching bam(s.model, s.problem.reward, noise, o, {o.batch_size, 2, "future"});
  Generator g1 = make_generator(5), g2 = make_generator(5);
  const Result ref = run(am, g1), got = run(bam, g2);
  EXPECT_NEAR(got.loss, ref.loss, 1e-5 * (1 + std::abs(ref.loss)));
  EXPECT_LT(max_grad_difference(got, ref), 1e-5 * (1 + max_grad(ref)));
  {
    at::NoGradGuard no_grad;
    Generator g = make_generator(9);
    for (auto& p : s.model->parameters()) p.add_(0.3 * at::randn(p.sizes(), g, p.options()));
  }
  bam.begin_iteration(1);
  Generator g3 = make_generator(6);
  bam.compute(g3);
  const AdjointBatch rows = bam.buffer().rows(bam.last_rows());
  ASSERT_TRUE(rows.c.defined());
  EXPECT_GT(std::get<0>(at::_unique(rows.c.select(1, 0))).numel(), 1) << "several conditions in the batch";
  const VelocityFieldPtr bound = bind_condition(VelocityFieldPtr(s.model), rows.c);
  const TimeGrid& grid = bam.adjoint_matching().grid();
  at::NoGradGuard no_grad;
  Tensor log_ratio = at::zeros({o.batch_size}, kDouble);
  double spread = 0;
  for (int64_t k = o.num_steps - 2; k >= 0; --k) {
    const StepKernel q = euler_kernel(bam.adjoint_matching().finetuned_sde(), grid[k], grid[k + 1]);
    const Tensor x = rows.x[k], next = rows.x[k + 1].to(at::kDouble);
    const Tensor m_new = q.mean(x, bound->velocity(x, grid[k])).to(at::kDouble);
    const Tensor m_old = q.mean(x, rows.v[k]).to(at::kDouble);
    log_ratio += ((next - m_old).pow(2).sum(1) - (next - m_new).pow(2).sum(1)) / (2 * q.std * q.std);
    if (!bam.last_weights()[k].defined()) continue;
    const Tensor expected = static_cast<double>(o.batch_size) * at::softmax(log_ratio, 0);
    EXPECT_LT((bam.last_weights()[k].to(at::kDouble) - expected).abs().max().item<double>(), 1e-4) << "k = " << k;
    spread = std::max(spread, expected.std().item<double>());
  }
  EXPECT_GT(spread, 0.01) << "the model must have moved";
}

TEST(ConditionalMethods, OdeAdjointMatchingEqualsTheBoundProblemRowByRow) {
  const Problem s = make_problem();
  OdeAdjointMatchingOptions o;
  o.num_steps = 8;
  o.batch_size = 12;
  o.lambda = 1.3;
  o.adjoint_steps = 5;
  o.truncated_control = "zero";
  o.loss_steps = 4;
  const RegulariserPtr psi = make_quadratic_regulariser(1.0);
  OdeAdjointMatchingOptions oc = o;
  oc.conditions = s.conditions;
  const OdeAdjointMatching conditional(s.model, s.problem.reward, psi, oc);
  Generator gen = make_generator(5);
  const OdeRegressionBatch got = conditional.regression_batch(gen);

  // The regression batch is built from B rows at a time: the bound problem gives it row for row.
  Generator ref_gen = make_generator(5);
  const Tensor C = s.conditions->draw(o.batch_size, ref_gen);
  const OdeAdjointMatching bound(bound_model(s, C), bound_reward(s, C), psi, o);
  const OdeRegressionBatch expected = bound.regression_batch(ref_gen);
  ASSERT_EQ(got.steps, expected.steps);
  EXPECT_TRUE(at::equal(got.conditions, C));
  const auto S = static_cast<int64_t>(got.steps.size());
  EXPECT_TRUE(at::equal(got.c, C.repeat({S, 1})));
  for (const auto& [name, a, b] : {std::make_tuple("x", got.x, expected.x), std::make_tuple("v_base", got.v_base, expected.v_base),
                                   std::make_tuple("target", got.target, expected.target),
                                   std::make_tuple("x1", got.x1, expected.x1),
                                   std::make_tuple("control_cost", got.control_cost, expected.control_cost)}) {
    EXPECT_LT((a - b).abs().max().item<double>(), 1e-5 * (1 + b.abs().max().item<double>())) << name;
  }
  EXPECT_GT(got.target.abs().max().item<double>(), 1e-3);

  // The loss stacks the S steps' rows: by hand, one step at a time through the bound residual.
  OdeAdjointMatching loss(s.model, s.problem.reward, psi, oc);
  Generator loss_gen = make_generator(5);
  const Result result = run(loss, loss_gen);
  const auto bound_residual = bind_condition(s.model->trainable(), C);
  const int64_t B = o.batch_size;
  Tensor sum = at::zeros({});
  for (int64_t j = 0; j < S; ++j) {
    const int64_t k = got.steps[j];
    const Tensor u = bound_residual->velocity(got.x.narrow(0, j * B, B), at::full({B}, k / 8.0));
    sum = sum + (1.0 / 8) * (u - got.target.narrow(0, j * B, B)).pow(2).sum();
  }
  const double n_trained = 8;  // truncated_control = "zero": every step is trained
  EXPECT_NEAR(result.loss, sum.item<double>() * n_trained / static_cast<double>(S * B), 1e-5 * (1 + result.loss));
}

// DDPO and GRPO: one condition for the batch ([1, dc]) gives the same loss and gradient as the bound
// problem; with several, sample() and log_prob() are the bound problem's row by row.
TEST(ConditionalMethods, PolicyGradientsEqualTheBoundProblem) {
  const Problem s = make_problem();
  PolicyGradientOptions o;
  o.num_steps = 6;
  o.batch_size = 12;
  o.group_size = 4;
  o.clip_range = 0.2;
  const Tensor c0 = s.problem.train.narrow(0, 1, 1).to(at::kFloat);
  const auto one = std::make_shared<const ConditionSet>(c0);
  for (bool grouped : {false, true}) {
    const std::string what = grouped ? "GRPO" : "DDPO";
    PolicyGradientOptions oc = o;
    oc.conditions = one;
    PolicyGradient conditional(s.model, s.problem.reward, oc, grouped);
    Generator gen = make_generator(8);
    const Result got = run(conditional, gen);
    PolicyGradient bound(bound_model(s, c0), bound_reward(s, c0), o, grouped);
    Generator ref_gen = make_generator(8);
    one->draw(grouped ? o.batch_size / o.group_size : o.batch_size, ref_gen);  // the draw the method makes
    expect_same(got, run(bound, ref_gen), what);
    EXPECT_TRUE(at::equal(conditional.batch().conditions, c0.expand({o.batch_size, 2}))) << what;
  }

  // Several conditions: the batch is sampled, and its log-densities taken, each row at its own c.
  PolicyGradientOptions oc = o;
  oc.conditions = s.conditions;
  const Ddpo conditional(s.model, s.problem.reward, oc);
  Generator cgen = make_generator(9);
  const Tensor C = s.conditions->draw(o.batch_size, cgen);
  const Tensor x0 = at::randn({o.batch_size, 2}, cgen);
  const std::vector<int64_t> steps{0, 2, 3};
  Generator gen = make_generator(10), ref_gen = make_generator(10);
  const PolicyBatch got = conditional.sample(x0, steps, gen, C);
  const Ddpo bound(bound_model(s, C), bound_reward(s, C), o);
  const PolicyBatch expected = bound.sample(x0, steps, ref_gen);
  EXPECT_TRUE(at::equal(got.conditions, C));
  EXPECT_LT((got.x1 - expected.x1).abs().max().item<double>(), 1e-5);
  EXPECT_LT((got.next_states - expected.next_states).abs().max().item<double>(), 1e-5);
  const Tensor lp = conditional.log_prob(got);
  for (int64_t j = 0; j < 3; ++j) {
    PolicyBatch one_step = expected;
    one_step.sde_steps = {steps[j]};
    one_step.states = expected.states.narrow(0, j, 1);
    one_step.next_states = expected.next_states.narrow(0, j, 1);
    const Tensor ref = bound.log_prob(one_step)[0];
    EXPECT_LT((lp[j] - ref).abs().max().item<double>(), 1e-5) << "step " << steps[j];
  }
  // The rows' conditions matter: permuting them changes the log-densities.
  PolicyBatch rolled = got;
  rolled.conditions = C.roll(1, 0);
  EXPECT_GT((conditional.log_prob(rolled) - lp).abs().max().item<double>(), 1e-3);
}

// RAM (E128): one condition per group of endpoints, drawn first; the endpoints' ODE, the reward, the baseline (the
// group's other members) and the regression at each row's own c: the bound problem's RAM with the same groups.
TEST(ConditionalMethods, RamEqualsTheBoundProblemWithOneConditionPerGroup) {
  const Problem s = make_problem();
  ReinforceAdjointMatchingOptions o;
  o.num_steps = 6;
  o.batch_size = 12;
  o.group_size = 4;
  o.noise_draws = 1;  // the bound model's conditions are one per endpoint
  o.critic_hidden = {};  // a conditional critic has an input the bound problem's does not: the group's mean alone
  expect_bound_equivalence(
      s,
      [&](ConditionSetPtr conditions) {
        ReinforceAdjointMatchingOptions oc = o;
        oc.conditions = conditions;
        return std::make_unique<ReinforceAdjointMatching>(s.model, s.problem.reward, oc);
      },
      [&](std::shared_ptr<FineTunedVelocity> model, RewardPtr reward) {
        return std::make_unique<ReinforceAdjointMatching>(model, reward, o);
      },
      [&](Generator& gen) { return s.conditions->draw(3, gen).repeat_interleave(4, 0); }, "RAM");
  ReinforceAdjointMatchingOptions whole = o;
  whole.group_size = 0;
  whole.conditions = s.conditions;
  EXPECT_THROW(ReinforceAdjointMatching(s.model, s.problem.reward, whole), Error);  // one baseline per condition
  // With its critic, which reads each row's condition: a step runs and the critic's output depends on c.
  ReinforceAdjointMatchingOptions oc = o;
  oc.critic_hidden = {8};
  oc.conditions = s.conditions;
  ReinforceAdjointMatching with_critic(s.model, s.problem.reward, oc);
  {
    at::NoGradGuard no_grad;
    Generator g = make_generator(2);
    for (auto& p : with_critic.parameters()) p.add_(0.1 * at::randn(p.sizes(), g));
  }
  Generator gen = make_generator(5);
  EXPECT_TRUE(std::isfinite(with_critic.compute(gen).loss.item<double>()));
  const Tensor x = at::randn({4, 2}, gen), t = at::full({4}, 0.5);
  const Tensor C = s.conditions->draw(4, gen);
  EXPECT_GT((with_critic.critic(x, t, C) - with_critic.critic(x, t, C.roll(1, 0))).abs().max().item<double>(), 1e-6);
}

// EAM (E132): one condition per endpoint, drawn first; the endpoints' ODE, the reward's gradient and the base's score
// (read off its velocity at score_time) at each endpoint's own c, and the regression at each row's c: the bound
// problem's EAM. Path weights are for an unconditional model.
TEST(ConditionalMethods, EamEqualsTheBoundProblemWithOneConditionPerEndpoint) {
  const Problem s = make_problem();
  EfficientAdjointMatchingOptions o;
  o.num_steps = 6;
  o.batch_size = 12;
  o.noise_draws = 1;  // the bound model's conditions are one per endpoint
  expect_bound_equivalence(
      s,
      [&](ConditionSetPtr conditions) {
        EfficientAdjointMatchingOptions oc = o;
        oc.conditions = conditions;
        return std::make_unique<EfficientAdjointMatching>(s.model, s.problem.reward, oc);
      },
      [&](std::shared_ptr<FineTunedVelocity> model, RewardPtr reward) {
        return std::make_unique<EfficientAdjointMatching>(model, reward, o);
      },
      [&](Generator& gen) { return s.conditions->draw(12, gen); }, "EAM");
  EfficientAdjointMatchingOptions weighted = o;
  weighted.conditions = s.conditions;
  weighted.path_weights = true;
  EXPECT_THROW(EfficientAdjointMatching(s.model, s.problem.reward, weighted), Error);
}

TEST(ConditionalMethods, GrpoGroupsAreOnePromptAndInnerEpochsKeepTheirConditions) {
  const Problem s = make_problem();
  PolicyGradientOptions o;
  o.num_steps = 5;
  o.batch_size = 16;
  o.group_size = 4;
  o.inner_epochs = 2;
  o.conditions = s.conditions;
  Grpo grpo(s.model, s.problem.reward, o);
  Generator gen = make_generator(4);
  grpo.begin_iteration(0);
  grpo.compute(gen);
  const PolicyBatch first = grpo.batch();
  const Tensor groups = first.conditions.view({4, 4, 2});
  EXPECT_TRUE(at::equal(groups, groups.narrow(1, 0, 1).expand_as(groups))) << "a group shares its condition";
  EXPECT_GT(std::get<0>(at::unique_dim(first.conditions, 0)).size(0), 1) << "groups draw their own";
  // A group shares its initial noise too, so its first state is one point; and the advantages are per group.
  const Tensor x0 = first.states[0].view({4, 4, 2});
  EXPECT_TRUE(at::equal(x0, x0.narrow(1, 0, 1).expand_as(x0)));
  EXPECT_LT(first.advantage.view({4, 4}).sum(1).abs().max().item<double>(), 1e-9);
  // The second inner epoch reuses the batch, conditions included, and its log-densities are at them.
  grpo.begin_iteration(1);
  grpo.compute(gen);
  EXPECT_TRUE(at::equal(grpo.batch().conditions, first.conditions));
  EXPECT_TRUE(at::equal(grpo.batch().next_states, first.next_states));
}

TEST(ConditionalMethods, ConditionsMustFitTheModelAndTheReward) {
  const Problem s = make_problem();
  const auto plain_base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  const auto plain = make_finetuned(plain_base, FineTuneMode::residual, {8}, 4, 1);
  const auto plain_reward = std::make_shared<QuadraticReward>(at::zeros({2}, kDouble), at::eye(2, kDouble));
  const auto wrong = std::make_shared<const ConditionSet>(at::zeros({2, 3}, kDouble));
  // A reward whose condition is not the model's.
  const auto other_reward = std::make_shared<ConditionalQuadraticReward>(at::zeros({2}, kDouble), at::ones({2, 1}, kDouble),
                                                                         at::eye(2, kDouble));
  const auto noise = make_memoryless_noise(0.1);
  const RegulariserPtr psi = make_quadratic_regulariser(1.0);
  // Each method built with (model, reward, conditions); returns nothing, throws what it throws.
  const std::vector<std::pair<std::string, std::function<void(std::shared_ptr<FineTunedVelocity>, RewardPtr, ConditionSetPtr)>>>
      methods{
          {"draft", [](auto m, auto r, auto c) { RewardBaselineOptions o; o.num_steps = 4; o.conditions = c; DraftK l(m, r, o); }},
          {"refl", [](auto m, auto r, auto c) { RewardBaselineOptions o; o.num_steps = 4; o.conditions = c; Refl l(m, r, o); }},
          {"discrete adjoint",
           [&](auto m, auto r, auto c) { RewardBaselineOptions o; o.num_steps = 4; o.conditions = c; DiscreteAdjoint l(m, r, noise, o); }},
          {"ddpo", [](auto m, auto r, auto c) { PolicyGradientOptions o; o.num_steps = 4; o.conditions = c; Ddpo l(m, r, o); }},
          {"grpo", [](auto m, auto r, auto c) { PolicyGradientOptions o; o.num_steps = 4; o.conditions = c; Grpo l(m, r, o); }},
          {"ode am",
           [&](auto m, auto r, auto c) { OdeAdjointMatchingOptions o; o.num_steps = 4; o.conditions = c; OdeAdjointMatching l(m, r, psi, o); }},
      };
  for (const auto& [name, make] : methods) {
    EXPECT_NO_THROW(make(s.model, s.problem.reward, s.conditions)) << name;
    EXPECT_NO_THROW(make(s.model, plain_reward, s.conditions)) << name << ": an unconditional reward is allowed";
    EXPECT_NO_THROW(make(plain, plain_reward, nullptr)) << name;
    EXPECT_THROW(make(plain, plain_reward, s.conditions), Error) << name << ": conditions for an unconditional model";
    EXPECT_THROW(make(s.model, s.problem.reward, nullptr), Error) << name << ": none for a conditional model";
    EXPECT_THROW(make(s.model, s.problem.reward, wrong), Error) << name << ": the wrong size";
    EXPECT_THROW(make(s.model, other_reward, s.conditions), Error) << name << ": a reward of another condition";
    EXPECT_THROW(make(plain, s.problem.reward, nullptr), Error) << name << ": a conditional reward, unconditional model";
  }
  // The messages name the method and the problem.
  try {
    RewardBaselineOptions o;
    o.num_steps = 4;
    DraftK loss(s.model, s.problem.reward, o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("draft"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("no conditions"), std::string::npos) << e.what();
  }
  // With an unconditional reward, a conditional model still trains: the reward is r(x) at every c.
  RewardBaselineOptions o;
  o.num_steps = 4;
  o.batch_size = 6;
  o.conditions = s.conditions;
  DiscreteAdjoint loss(s.model, plain_reward, noise, o);
  Generator gen = make_generator(1);
  EXPECT_TRUE(std::isfinite(loss.compute(gen).loss.item<double>()));
}

// The discrete adjoint over three training conditions, 100 iterations: at each training condition the
// fine-tuned model's samples are closer to the exact p*(. | c) (energy distance over its noise floor)
// than the base's, by a factor of 2 or more (about 4 to 50 at these settings).
TEST(ConditionalMethods, DiscreteAdjointOverConditionsMovesEachConditionTowardsItsTilt) {
  const ConditionalProblem p = random_conditional_problem(2, 1, 11, make_linear_schedule(), 3);
  const auto model = make_finetuned(p.base, FineTuneMode::residual, {64, 64}, 8, 12);
  RewardBaselineOptions o;
  o.num_steps = 10;
  o.batch_size = 64;
  o.lambda = p.lambda;
  o.conditions = std::make_shared<const ConditionSet>(p.train);
  DiscreteAdjoint loss(model, p.reward, make_memoryless_noise(1.0 / 10), o);
  TrainerOptions t;
  t.iterations = 100;
  t.adam.lr = 5e-3;
  t.lr_schedule = LrSchedule::cosine;
  t.grad_clip = 0.0;
  t.seed = 5;
  t.progress = false;
  Trainer(loss, t).run();

  ConditionScoreOptions so;
  so.samples = 800;
  so.steps = 30;
  so.floor_pairs = 2;
  so.seed = 7;
  const auto exact = [&](const Tensor& c) { return p.exact(c); };
  const auto noise = make_memoryless_noise(1.0 / 30);
  const auto base = score_conditions(GenerativeSDE(p.base, noise), p.train, exact, so);
  const auto tuned = score_conditions(GenerativeSDE(model, noise), p.train, exact, so);
  for (size_t i = 0; i < base.size(); ++i) {
    EXPECT_LT(tuned[i].ratio, 0.5 * base[i].ratio) << "condition " << base[i].condition[0];
  }
  EXPECT_GT(summarise(base).median, 5.0) << "the tilt must be far from the base";
  EXPECT_LT(summarise(tuned).median, 0.3 * summarise(base).median);
}

}  // namespace
}  // namespace tilt
