// Labelled image data sets, read from files shipped with the repository: the 8x8 handwritten
// digits (data/digits/README.md). Pixels are scaled to [-1, 1], images flattened row by row.
#pragma once

#include "tilt/train/dataset.h"  // ImageDataset, select_class, split_dataset

#include <string>

namespace tilt {

/// The digits CSV (plain or gzip-compressed): each line holds 64 pixel values 0..16 and a label
/// 0..9. Throws tilt::Error naming the file and the line for a missing file, a ragged line, a
/// value out of range or a non-number.
ImageDataset load_digits(const std::string& path);

}  // namespace tilt
