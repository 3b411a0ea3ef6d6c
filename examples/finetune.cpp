// Fine-tunes a velocity network of one's own towards a reward written as a lambda, saves, reloads, samples.
#include <tilt/tilt.h>
#include <torch/torch.h>
#include <cstdio>
using namespace tilt;

struct MyNet : VelocityField {  // v(x, t) = an MLP of [x, t]
  mutable torch::nn::Sequential net{torch::nn::Linear(3, 64), torch::nn::SiLU(), torch::nn::Linear(64, 2)};
  explicit MyNet(SchedulePtr s) : VelocityField(std::move(s)) {}
  std::string kind() const override { return "my_net"; }
  int64_t dim() const override { return 2; }
  Tensor velocity(const Tensor& x, const Tensor& t) const override {
    return net->forward(torch::cat({x, t.to(x.dtype()).reshape({-1, 1}).expand({x.size(0), 1})}, 1));
  }
  NamedTensors named_parameters() const override {  // what is trained and what model files store
    NamedTensors out;
    for (const auto& p : net->named_parameters()) out.emplace_back(p.key(), p.value());
    return out;
  }
  VelocityFieldPtr clone() const override {  // copy-mode fine-tuning trains a deep copy
    auto copy = std::make_shared<MyNet>(schedule());
    copy->net = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone());
    return copy;
  }
};

int main() {
  torch::manual_seed(0);
  register_model_kind("my_net", [](const VelocityField&) { return Json::object(); },
                      [](const Json&, SchedulePtr s) { return std::make_shared<MyNet>(s); });
  auto base = std::make_shared<MyNet>(make_linear_schedule());
  auto reward = std::make_shared<FunctionReward>(2, [](const Tensor& x) { return -(x - 2.0).pow(2).sum(1); });
  auto model = make_finetuned(base, FineTuneMode::copy, {}, 0, 0);  // a trainable clone of the base
  AdjointMatching loss(model, reward, make_memoryless_noise(), {});
  TrainerOptions options;
  options.iterations = 300, options.adam.lr = 1e-3, options.progress = false;
  auto mean_reward = [&](VelocityFieldPtr v, Generator gen = make_generator(1)) {
    return reward->value(sample(GenerativeSDE(v, make_memoryless_noise()), 2000, TimeGrid::uniform(40), gen)).mean().item<double>();
  };
  const double before = mean_reward(base);
  Trainer(loss, options).run();
  save_velocity(*model, "finetuned_example.pt");
  const double after = mean_reward(load_velocity("finetuned_example.pt").field);
  std::printf("mean reward before %.3f after %.3f\n", before, after);
  return after > before + 1.0 ? 0 : 1;
}
