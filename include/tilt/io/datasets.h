// Labelled image data sets, read from files shipped with the repository: the 8x8 handwritten
// digits (data/digits/README.md). Pixels are scaled to [-1, 1], images flattened row by row.
#pragma once

#include "tilt/core/tensor.h"

#include <string>

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

/// The digits CSV (plain or gzip-compressed): each line holds 64 pixel values 0..16 and a label
/// 0..9. Throws tilt::Error naming the file and the line for a missing file, a ragged line, a
/// value out of range or a non-number.
ImageDataset load_digits(const std::string& path);

/// The images of one class.
ImageDataset select_class(const ImageDataset& data, int64_t label);

/// A split that holds out `test_fraction` of every class, the held-out images chosen by `seed`:
/// the same seed always gives the same split.
struct DatasetSplit {
  ImageDataset train, test;
};
DatasetSplit split_dataset(const ImageDataset& data, double test_fraction, uint64_t seed);

}  // namespace tilt
