#include "tilt/train/dataset.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace tilt {

int64_t ImageDataset::size() const { return images.defined() ? images.size(0) : 0; }

ImageDataset select_class(const ImageDataset& data, int64_t label) {
  if (label < 0 || label >= data.classes) {
    throw Error("class " + std::to_string(label) + " does not exist (the data set has classes 0.." +
                std::to_string(data.classes - 1) + ")");
  }
  ImageDataset out = data;
  const Tensor idx = at::nonzero(data.labels == label).squeeze(1);
  out.images = data.images.index_select(0, idx);
  out.labels = data.labels.index_select(0, idx);
  return out;
}

DatasetSplit split_dataset(const ImageDataset& data, double test_fraction, uint64_t seed) {
  if (!(test_fraction > 0.0 && test_fraction < 1.0)) {
    throw Error("the held-out fraction must be in (0, 1), got " + std::to_string(test_fraction));
  }
  Generator gen = make_generator(seed);
  std::vector<Tensor> train_idx, test_idx;
  for (int64_t c = 0; c < data.classes; ++c) {
    const Tensor idx = at::nonzero(data.labels == c).squeeze(1);
    const int64_t n = idx.size(0);
    if (n == 0) continue;
    const Tensor perm = idx.index_select(0, at::randperm(n, gen, at::TensorOptions().dtype(at::kLong)));
    // At least one held out and one kept of each class: a class of one image trains (the classifier must know it).
    const auto n_test = std::min<int64_t>(
        n - 1, std::max<int64_t>(1, static_cast<int64_t>(test_fraction * static_cast<double>(n) + 0.5)));
    test_idx.push_back(perm.slice(0, 0, n_test));
    train_idx.push_back(perm.slice(0, n_test));
  }
  const auto take = [&](const std::vector<Tensor>& parts) {
    ImageDataset out = data;
    const Tensor idx = std::get<0>(at::sort(at::cat(parts)));
    out.images = data.images.index_select(0, idx);
    out.labels = data.labels.index_select(0, idx);
    return out;
  };
  return {take(train_idx), take(test_idx)};
}

}  // namespace tilt
