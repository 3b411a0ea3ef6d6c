// A labelled image data set in memory, and the selections training and evaluation make of it. Reading
// one from a file is the io layer's (io/datasets.h); the classifier's training (train/classification.h)
// takes one as it is.
#pragma once

#include "tilt/core/tensor.h"

#include <cstdint>

namespace tilt {

struct ImageDataset {
  Tensor images;        ///< [N, height * width] float32 in [-1, 1], row-major pixels
  Tensor labels;        ///< [N] int64 in 0..classes-1
  int64_t height = 0;
  int64_t width = 0;
  int64_t classes = 0;

  int64_t size() const;
  int64_t dim() const { return height * width; }
};

/// The images of one class.
ImageDataset select_class(const ImageDataset& data, int64_t label);

/// A split that holds out `test_fraction` of every class (rounded, at least one image and never the last: a class of
/// one image is kept for training), the held-out images chosen by `seed`: the same seed always gives the same split.
struct DatasetSplit {
  ImageDataset train, test;
};
DatasetSplit split_dataset(const ImageDataset& data, double test_fraction, uint64_t seed);

}  // namespace tilt
