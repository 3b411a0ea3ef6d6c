// Conditional flow matching with condition dropout (docs/conditions.md; docs/equations.md, E100), against
// exact ground truth: the loss is smallest at the exact conditional mixture field (E98), its null rows at
// the field of the average over the training conditions, its gradient matches finite differences, and a
// short pretraining learns p_base(. | c) at each training condition and the average as its null condition.
#include "tilt/core/error.h"
#include "tilt/eval/conditions.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/config.h"
#include "tilt/io/datasets.h"
#include "tilt/io/training.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// A 2-D conditional mixture (three components moved by M c, dc = 1) and its training conditions.
struct Problem {
  std::shared_ptr<ConditionalGmmVelocity> exact;
  ConditionSetPtr train;
  ConditionalDataSampler data;
};

Problem problem(std::shared_ptr<GaussianMixture> p0, const at::Tensor& M, const std::vector<double>& conditions) {
  Problem p;
  p.exact = std::make_shared<ConditionalGmmVelocity>(p0, M, make_linear_schedule());
  p.train = std::make_shared<const ConditionSet>(at::tensor(conditions, kDouble).reshape({-1, 1}));
  p.data = conditional_mixture_sampler(p0, M, p.train);
  return p;
}

Problem random_problem() {
  return problem(test::random_mixture(2, 3, 4), at::tensor({1.5, -1.0}, kDouble).reshape({2, 1}), {-1.0, 0.0, 1.0});
}

// The same mixture with p_0's means and M replaced, and a null law.
std::shared_ptr<ConditionalGmmVelocity> variant(const ConditionalGmmVelocity& f, const at::Tensor& means, const at::Tensor& M,
                                                std::shared_ptr<const GaussianMixture> null = nullptr) {
  auto p0 = std::make_shared<GaussianMixture>(f.mixture().weights(), means, f.mixture().covariances());
  return std::make_shared<ConditionalGmmVelocity>(p0, M, f.schedule(), std::move(null));
}

double loss_at(VelocityFieldPtr field, const ConditionalDataSampler& data, double dropout, int64_t batch, uint64_t seed) {
  FlowMatchingOptions o;
  o.batch_size = batch;
  o.condition_dropout = dropout;
  FlowMatching loss(std::move(field), data, o);
  Generator gen = make_generator(seed);
  at::NoGradGuard no_grad;
  return loss.compute(gen).loss.item<double>();
}

TEST(ConditionalFlowMatching, MixtureDataAreTheMovedMixtureAndDatasetRowsKeepTheirConditions) {
  const Problem p = random_problem();
  Generator gen = make_generator(1);
  const DataBatch b = p.data(20000, gen);
  ASSERT_EQ(b.c.sizes(), (at::IntArrayRef{20000, 1}));
  for (double c : {-1.0, 0.0, 1.0}) {  // each condition drawn about a third of the time, its rows from p_0(. - M c)
    const at::Tensor rows = b.x.index({b.c.squeeze(1) == c}).to(at::kDouble);
    EXPECT_NEAR(rows.size(0) / 20000.0, 1.0 / 3.0, 0.02);
    const at::Tensor mean = p.exact->mixture_at(at::tensor({c}, kDouble)).mean();
    EXPECT_LT((rows.mean(0) - mean).abs().max().item<double>(), 0.1) << c;
  }
  const at::Tensor data = at::arange(10, kDouble).reshape({5, 2}), labels = at::arange(5, kDouble).reshape({5, 1});
  Generator g1 = make_generator(3), g2 = make_generator(3);
  const DataBatch d = dataset_sampler(data, labels)(7, g1);
  EXPECT_TRUE(at::equal(d.x, dataset_sampler(data)(7, g2)));  // the unconditional sampler's draws
  EXPECT_TRUE(at::equal(d.x.select(1, 0), 2.0 * d.c.squeeze(1)));
  EXPECT_THROW(dataset_sampler(data, labels.narrow(0, 0, 4)), Error);
  EXPECT_THROW(conditional_mixture_sampler(test::random_mixture(2, 3, 4), at::zeros({3, 1}, kDouble), p.train), Error);
}

// E100 with p = 0 is E5 at each condition: the exact conditional field minimises it.
TEST(ConditionalFlowMatching, LossIsLowestAtTheExactConditionalField) {
  const Problem p = random_problem();
  const ConditionalGmmVelocity& f = *p.exact;
  const int64_t B = 100000;
  const double exact = loss_at(p.exact, p.data, 0.0, B, 9);
  const at::Tensor shift = at::tensor({0.25, 0.0}, kDouble).reshape({1, 2});
  for (double s : {-1.0, 1.0}) {
    EXPECT_LT(exact, loss_at(variant(f, f.mixture().means() + s * shift, f.shift()), p.data, 0.0, B, 9)) << s;
    EXPECT_LT(exact, loss_at(variant(f, f.mixture().means(), f.shift() * (1 + 0.2 * s)), p.data, 0.0, B, 9)) << s;
  }
  // The field that ignores c (M = 0) is far worse.
  EXPECT_LT(exact + 0.1, loss_at(variant(f, f.mixture().means(), f.shift() * 0.0), p.data, 0.0, B, 9));
}

// The null rows regress onto the velocity of the data's law with c forgotten: the average of p_base(. | c)
// over the training conditions (ConditionalGmmVelocity::marginal, E98). The conditional rows are the same
// in every variant below (same draws, same conditional field), so the differences are the null rows'.
TEST(ConditionalFlowMatching, NullRowsAreMinimisedByTheAverageOverTheTrainingConditions) {
  const Problem p = random_problem();
  const ConditionalGmmVelocity& f = *p.exact;
  const auto marginal = std::make_shared<GaussianMixture>(f.marginal(*p.train));
  const auto with_null = [&](std::shared_ptr<const GaussianMixture> null) {
    return variant(f, f.mixture().means(), f.shift(), std::move(null));
  };
  const int64_t B = 100000;
  const double best = loss_at(with_null(marginal), p.data, 0.5, B, 21);
  for (int64_t j = 0; j < p.train->size(); ++j) {  // any one training condition's law
    const auto one = std::make_shared<GaussianMixture>(f.mixture_at(p.train->values()[j]));
    EXPECT_LT(best + 0.05, loss_at(with_null(one), p.data, 0.5, B, 21)) << j;
  }
  for (double s : {-1.0, 1.0}) {  // the average's means moved, or its weights tilted towards one condition
    const auto moved = std::make_shared<GaussianMixture>(marginal->weights(), marginal->means() + 0.2 * s,
                                                         marginal->covariances());
    EXPECT_LT(best, loss_at(with_null(moved), p.data, 0.5, B, 21)) << s;
    const at::Tensor w = marginal->weights() * (1.0 + 0.5 * s * at::linspace(-1, 1, marginal->components(), kDouble));
    const auto tilted = std::make_shared<GaussianMixture>(w / w.sum(), marginal->means(), marginal->covariances());
    EXPECT_LT(best, loss_at(with_null(tilted), p.data, 0.5, B, 21)) << s;
  }
}

// The loss with dropout is E100 row by row (the same draws by hand), and its gradient for a small
// conditional MLP matches central finite differences of it in every parameter.
TEST(ConditionalFlowMatching, DropoutLossIsE100AndItsGradientMatchesFiniteDifferences) {
  const Problem p = random_problem();
  MlpOptions mo;
  mo.dim = 2;
  mo.hidden = {8};
  mo.time_features = 4;
  mo.condition_dim = 1;
  const auto model = std::make_shared<MlpVelocity>(mo, make_linear_schedule(), 3);
  FlowMatchingOptions o;
  o.batch_size = 64;
  o.condition_dropout = 0.4;
  FlowMatching loss(model, p.data, o);
  const auto value = [&] {
    Generator gen = make_generator(17);
    return loss.compute(gen).loss;
  };
  {  // By hand: data, X0, t, then one uniform per row.
    at::NoGradGuard no_grad;
    Generator gen = make_generator(17);
    const DataBatch b = p.data(64, gen);
    const at::Tensor x0 = at::randn({64, 2}, gen), t = at::rand({64}, gen), dropped = at::rand({64}, gen) < 0.4;
    const ScheduleTensors s = model->schedule()->at(t);
    const at::Tensor xt = s.alpha.unsqueeze(1) * b.x + s.beta.unsqueeze(1) * x0;
    const at::Tensor target = s.d_alpha.unsqueeze(1) * b.x + s.d_beta.unsqueeze(1) * x0;
    const at::Tensor v = at::where(dropped.unsqueeze(1), model->velocity(xt, t), model->conditional_velocity(xt, t, b.c));
    const double expected = (v - target).pow(2).sum(1).mean().item<double>();
    EXPECT_GT(dropped.sum().item<int64_t>(), 10);
    EXPECT_NEAR(value().item<double>(), expected, 1e-5 * expected);
  }
  const std::vector<at::Tensor> params = model->parameters();
  value().backward();
  std::vector<at::Tensor> grads;
  for (const auto& q : params) grads.push_back(q.grad().clone());
  const double h = 1e-2;
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor flat = params[k].detach().view({-1});
    const at::Tensor g = grads[k].reshape({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const float saved = flat[i].item<float>();
      at::NoGradGuard no_grad;
      flat[i] = saved + h;
      const double up = value().item<double>();
      flat[i] = saved - h;
      const double down = value().item<double>();
      flat[i] = saved;
      const double fd = (up - down) / (2 * h), got = g[i].item<double>();
      EXPECT_NEAR(got, fd, 2e-3 * (1 + std::abs(fd))) << "parameter " << k << " entry " << i;
    }
  }
}

// A short pretraining (1500 iterations of 256, ~5 s) of a small conditional MLP on a 2-D conditional
// Gaussian over three training conditions. Sampled by the ODE, each training condition's samples are within
// 5x the noise floor of p_base(. | c) (2.3-3.0 here) and over 10x further from a neighbouring condition's
// law (~1000x); the null condition's are within 5x the floor of the average over the three (3.0; what
// E100's null rows learn) and 5x closer to it than to the middle condition's law (15x); guided samples
// (w = 2) stay 5x closer to their condition's law than to the average (13x).
TEST(ConditionalFlowMatching, ShortPretrainingLearnsEachConditionAndTheAverageAsTheNull) {
  const Problem p = problem(test::isotropic_gaussian({0.0, 0.0}, 0.4), at::tensor({2.0, 1.0}, kDouble).reshape({2, 1}),
                            {-1.0, 0.0, 1.0});
  MlpOptions mo;
  mo.dim = 2;
  mo.hidden = {32, 32};
  mo.time_features = 8;
  mo.condition_dim = 1;
  const auto model = std::make_shared<MlpVelocity>(mo, make_linear_schedule(), 5);
  FlowMatchingOptions fo;
  fo.batch_size = 256;
  fo.condition_dropout = 0.2;
  FlowMatching loss(model, p.data, fo);
  TrainerOptions to;
  to.iterations = 1500;
  to.adam.lr = 5e-3;
  to.lr_schedule = LrSchedule::cosine;
  to.seed = 2;
  to.progress = false;
  Trainer(loss, to).run();

  at::NoGradGuard no_grad;
  const auto ode = make_zero_noise();
  ConditionScoreOptions so;
  so.samples = 1000;
  so.steps = 40;
  so.integrator = Integrator::heun;
  so.floor_pairs = 2;
  so.seed = 8;
  const at::Tensor train = p.train->values();
  const auto own = score_conditions(GenerativeSDE(model, ode), train,
                                    [&](const Tensor& c) { return p.exact->mixture_at(c); }, so);
  const auto other = score_conditions(GenerativeSDE(model, ode), train,  // the next condition's law, cyclically
                                      [&](const Tensor& c) { return p.exact->mixture_at(at::remainder(c + 2.0, 3.0) - 1.0); }, so);
  for (size_t i = 0; i < own.size(); ++i) {
    EXPECT_LT(own[i].ratio, 5.0) << "condition " << own[i].condition[0];
    EXPECT_LT(10.0 * own[i].energy, other[i].energy) << "condition " << own[i].condition[0];
  }
  const GaussianMixture marginal = p.exact->marginal(*p.train);
  const GaussianMixture middle = p.exact->mixture_at(at::zeros({1}, kDouble));
  Generator gen = make_generator(12);
  const TimeGrid grid = TimeGrid::uniform(40);
  SampleOptions heun;
  heun.integrator = Integrator::heun;
  const at::Tensor null = sample(GenerativeSDE(model, ode), 1000, grid, gen, heun);
  const double null_floor = test::energy_noise_floor(marginal, 1000, 2, 13);
  const double to_marginal = energy_distance(null, marginal.sample(1000, gen));
  EXPECT_LT(to_marginal, 5.0 * null_floor);
  EXPECT_LT(5.0 * to_marginal, energy_distance(null, middle.sample(1000, gen)));
  const at::Tensor c = at::ones({1, 1});
  const at::Tensor guided = sample(GenerativeSDE(bind_condition(model, c, 2.0), ode), 1000, grid, gen, heun);
  const GaussianMixture at_c = p.exact->mixture_at(c.to(at::kDouble));
  EXPECT_LT(5.0 * energy_distance(guided, at_c.sample(1000, gen)), energy_distance(guided, marginal.sample(1000, gen)));
}

// read_pretrain: the conditional mixture and the digits give conditional plans (the digits' c the one-hot
// row of each image's label); a plain mixture's plan draws exactly E5's batch as before (data, X0, t).
TEST(ConditionalFlowMatching, PretrainPlansFromTheConfig) {
  const Json ring = {{"type", "ring"}, {"components", 4}, {"radius", 2.0}, {"std", 0.5}};
  Json moving = ring;
  moving["shift"] = {{1.0}, {0.0}};
  Config mixture_config(Json{{"data", moving}, {"conditions", {{"train", {{-1.0}, {1.0}}}}},
                             {"pretrain", {{"hidden", {8}}, {"condition_dropout", 0.25}}}}, "test");
  ConfigSection root = mixture_config.root();
  const PretrainPlan mixture = read_pretrain(root);
  ASSERT_TRUE(mixture.conditions);
  EXPECT_EQ(mixture.mlp.condition_dim, 1);
  EXPECT_EQ(mixture.conditions->size(), 2);
  EXPECT_EQ(mixture.flow_matching.condition_dropout, 0.25);

  const std::string path = std::string(TILT_SOURCE_DIR) + "/data/digits/digits.csv.gz";
  Config digits_config(Json{{"data", {{"type", "digits"}, {"path", path}}}, {"conditions", {{"classes", 10}}},
                            {"pretrain", {{"hidden", {8}}}}}, "test");
  ConfigSection droot = digits_config.root();
  const PretrainPlan digits = read_pretrain(droot);
  ASSERT_TRUE(digits.conditions);
  EXPECT_EQ(digits.mlp.condition_dim, 10);
  EXPECT_EQ(digits.flow_matching.condition_dropout, 0.1);
  const ImageDataset images = load_digits(path);
  Generator gen = make_generator(4);
  const DataBatch b = digits.conditional_data(20, gen);
  for (int64_t i = 0; i < 20; ++i) {
    EXPECT_EQ(b.c[i].sum().item<double>(), 1.0);
    const int64_t label = b.c[i].argmax().item<int64_t>();
    const at::Tensor same = (images.images == b.x[i].unsqueeze(0)).all(1);  // the image(s) drawn
    ASSERT_GT(same.sum().item<int64_t>(), 0);
    EXPECT_TRUE(images.labels.index({same}).eq(label).all().item<bool>()) << "row " << i;
  }

  Config plain_config(Json{{"data", ring}, {"pretrain", {{"hidden", {8}}, {"batch_size", 32}}}}, "test");
  ConfigSection proot = plain_config.root();
  const PretrainPlan plain = read_pretrain(proot);
  ASSERT_FALSE(plain.conditions);
  EXPECT_EQ(plain.mlp.condition_dim, 0);
  MlpOptions mo = plain.mlp;
  const auto model = std::make_shared<MlpVelocity>(mo, plain.schedule, 1);
  Generator g1 = make_generator(6), g2 = make_generator(6);
  at::NoGradGuard no_grad;
  const double got = make_flow_matching(plain, model)->compute(g1).loss.item<double>();
  const at::Tensor x1 = plain.data(32, g2), x0 = at::randn({32, 2}, g2), t = at::rand({32}, g2);
  const ScheduleTensors s = plain.schedule->at(t);
  const at::Tensor xt = s.alpha.unsqueeze(1) * x1 + s.beta.unsqueeze(1) * x0;
  const at::Tensor target = s.d_alpha.unsqueeze(1) * x1 + s.d_beta.unsqueeze(1) * x0;
  EXPECT_EQ(got, (model->velocity(xt, t) - target).pow(2).sum(1).mean().item<double>());
}

TEST(ConditionalFlowMatching, RefusesMismatchesAndDropoutOutOfRange) {
  const Problem p = random_problem();
  MlpOptions mo;
  mo.hidden = {8};
  const auto plain = std::make_shared<MlpVelocity>(mo, make_linear_schedule(), 1);
  mo.condition_dim = 1;
  const auto conditional = std::make_shared<MlpVelocity>(mo, make_linear_schedule(), 1);
  FlowMatchingOptions o;
  EXPECT_THROW(FlowMatching(plain, p.data, o), Error);
  EXPECT_THROW(FlowMatching(conditional, DataSampler([](int64_t n, Generator& g) { return at::randn({n, 2}, g); }), o), Error);
  for (double bad : {-0.1, 1.0, std::nan("")}) {
    o.condition_dropout = bad;
    EXPECT_THROW(FlowMatching(conditional, p.data, o), Error) << bad;
  }
  o.condition_dropout = 0.1;
  mo.condition_dim = 2;  // the data's conditions have 1 number
  FlowMatching wrong(std::make_shared<MlpVelocity>(mo, make_linear_schedule(), 1), p.data, o);
  Generator gen = make_generator(0);
  EXPECT_THROW(wrong.compute(gen), Error);
}

}  // namespace
}  // namespace tilt
