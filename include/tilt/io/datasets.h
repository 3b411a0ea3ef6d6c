// Labelled image data sets: the 8x8 handwritten digits shipped with the repository
// (data/digits/README.md), and the 28x28 Fashion-MNIST images of the Debian package
// dataset-fashion-mnist (scripts/setup.sh installs it). Pixels are scaled to [-1, 1], images
// flattened row by row.
#pragma once

#include "tilt/train/dataset.h"  // ImageDataset, select_class, split_dataset

#include <string>
#include <vector>

namespace tilt {

/// The digits CSV (plain or gzip-compressed): each line holds 64 pixel values 0..16 and a label
/// 0..9. Throws tilt::Error naming the file and the line for a missing file, a ragged line, a
/// value out of range or a non-number.
ImageDataset load_digits(const std::string& path);

/// Where dataset-fashion-mnist puts the files.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

/// An image file and a label file in the idx format of MNIST (big-endian headers: magic 0x803, count,
/// rows, columns, then one byte 0..255 per pixel; magic 0x801, count, then one byte per label), plain
/// or gzip-compressed. Pixels p become p / 127.5 - 1. `classes` bounds the labels; `limit` > 0 keeps
/// the first `limit` images. Throws tilt::Error naming the file for a missing file, a bad magic
/// number, zero dimensions, truncated or trailing data, a label count that differs from the image
/// count, or a label outside 0..classes-1.
ImageDataset load_idx(const std::string& images_path, const std::string& labels_path, int64_t classes,
                      int64_t limit = 0);

/// Fashion-MNIST's training set (split "train", 60000 images) or test set ("t10k", 10000) from the
/// directory `dir`: 28x28 images of 10 classes. A missing directory's error says how to install it.
/// The files load_fashion_mnist(dir, split) reads: the images', then the labels'.
std::vector<std::string> fashion_mnist_files(const std::string& dir, const std::string& split = "train");
ImageDataset load_fashion_mnist(const std::string& dir = kFashionMnistDir, const std::string& split = "train",
                                int64_t limit = 0);

}  // namespace tilt
