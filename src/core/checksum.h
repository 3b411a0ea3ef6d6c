// (Private to the library.) CRC-32 of bytes, as zlib computes it: it detects every single-bit and
// every burst error up to 32 bits, which is what a flipped bit on disk or a torn copy looks like.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tilt {

/// CRC-32 of n bytes, continuing from `crc` (0 to start).
uint32_t crc32_bytes(const void* data, size_t n, uint32_t crc = 0);

inline uint32_t crc32_bytes(const std::string& s, uint32_t crc = 0) { return crc32_bytes(s.data(), s.size(), crc); }

/// What is wrong with a zip archive as LibTorch writes them (model, classifier and TorchScript
/// files): "" when every record matches the CRC-32 of the zip's central directory and nothing follows
/// the archive. LibTorch's reader checks none of this, and a damaged archive can crash it.
std::string zip_damage(const std::string& bytes);

}  // namespace tilt
