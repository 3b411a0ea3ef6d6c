#include "tilt/soc/loss.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <cmath>
#include <exception>
#include <string>

namespace tilt {

// Loss's one out-of-line virtual: its vtable lives in the soc layer, with the interface.
void Loss::set_batch_size(int64_t) {
  throw Error("the " + name() + " loss cannot draw its batch in shards");
}

LossSum::LossSum(std::string name, std::vector<Term> terms) : name_(std::move(name)), terms_(std::move(terms)) {
  if (terms_.empty()) throw Error("a sum of losses needs at least one term");
  for (const Term& t : terms_) {
    if (!t.loss) throw Error("a sum of losses: a term has no loss");
    if (!(t.weight >= 0.0 && std::isfinite(t.weight))) {
      throw Error("a sum of losses: the weight of " + t.loss->name() + " must be finite and >= 0, got " +
                  std::to_string(t.weight));
    }
  }
}

LossOutput LossSum::compute(Generator& gen) {
  LossOutput out;
  for (size_t i = 0; i < terms_.size(); ++i) {
    LossOutput part = terms_[i].loss->compute(gen);
    out.loss = out.loss.defined() ? out.loss + terms_[i].weight * part.loss : terms_[i].weight * part.loss;
    const std::string prefix = i == 0 ? std::string() : terms_[i].loss->name() + "_";
    for (auto& [key, value] : part.metrics) out.metrics.emplace_back(prefix + key, value);
  }
  return out;
}

void LossSum::begin_iteration(int64_t iteration) {
  for (Term& t : terms_) t.loss->begin_iteration(iteration);
}

void LossSum::set_batch_size(int64_t n) {
  for (Term& t : terms_) t.loss->set_batch_size(n);
}

// Each term's state under "<index>/<its key>", so that two terms may use the same keys.
std::vector<std::pair<std::string, Tensor>> LossSum::state() const {
  std::vector<std::pair<std::string, Tensor>> all;
  for (size_t i = 0; i < terms_.size(); ++i) {
    for (auto& [key, value] : terms_[i].loss->state()) all.emplace_back(std::to_string(i) + "/" + key, value);
  }
  return all;
}

void LossSum::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  std::vector<std::vector<std::pair<std::string, Tensor>>> parts(terms_.size());
  for (const auto& [key, value] : state) {
    const size_t slash = key.find('/');
    size_t i = terms_.size();
    try {
      if (slash != std::string::npos) i = std::stoul(key.substr(0, slash));
    } catch (const std::exception&) {
    }
    if (i >= terms_.size()) throw Error("a sum of losses: the saved state has an entry '" + key + "' of no term");
    parts[i].emplace_back(key.substr(slash + 1), value);
  }
  for (size_t i = 0; i < terms_.size(); ++i) terms_[i].loss->load_state(parts[i]);
}

}  // namespace tilt
