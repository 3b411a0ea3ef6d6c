#include "checksum.h"

#include <zlib.h>

#include <algorithm>
#include <string>
#include <vector>

namespace tilt {

namespace {
uint64_t little_endian(const std::string& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + static_cast<size_t>(i)]);
  return v;
}

// Inflates a deflated record (as TorchScript archives store their code) and checks its CRC-32 and size.
bool inflated_crc_matches(const char* data, uint64_t size, uint64_t expected_size, uint64_t crc) {
  z_stream z{};
  if (inflateInit2(&z, -MAX_WBITS) != Z_OK) return false;
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data));
  z.avail_in = static_cast<uInt>(size);
  std::vector<unsigned char> out(1 << 15);
  uLong c = 0;
  uint64_t total = 0;
  int rc = Z_OK;
  while (rc == Z_OK) {
    z.next_out = out.data();
    z.avail_out = static_cast<uInt>(out.size());
    rc = inflate(&z, Z_NO_FLUSH);
    const size_t n = out.size() - z.avail_out;
    c = ::crc32(c, out.data(), static_cast<uInt>(n));
    total += n;
    if (rc == Z_BUF_ERROR && n == 0) break;
  }
  inflateEnd(&z);
  return rc == Z_STREAM_END && total == expected_size && c == crc;
}

}  // namespace

// Checks every record of the zip archive that LibTorch writes (stored, not compressed) against the
// CRC-32 in the zip's central directory, before LibTorch parses a byte: its reader does not check
// them, and a damaged archive can crash it. Returns what is wrong, or "" for a sound archive.
std::string zip_damage(const std::string& b) {
  constexpr uint64_t kMax32 = 0xFFFFFFFFu;
  if (b.size() < 22) return "too short to be a tilt file";
  // The end-of-central-directory record: the last "PK\5\6" within the final 64 KiB + 22 bytes.
  const size_t lo = b.size() > 65557 ? b.size() - 65557 : 0;
  size_t eocd = std::string::npos;
  for (size_t i = b.size() - 22 + 1; i-- > lo;) {
    if (b.compare(i, 4, "PK\x05\x06") == 0) {
      eocd = i;
      break;
    }
  }
  if (eocd == std::string::npos) return "not a zip archive";
  if (eocd + 22 + little_endian(b, eocd + 20, 2) != b.size()) return "bytes after the end of the zip archive";
  uint64_t entries = little_endian(b, eocd + 10, 2), dir_size = little_endian(b, eocd + 12, 4),
           dir_offset = little_endian(b, eocd + 16, 4);
  // LibTorch always writes the zip64 end records; they must be there and agree with the plain ones.
  if (eocd < 20 || b.compare(eocd - 20, 4, "PK\x06\x07") != 0) return "a damaged zip64 locator";
  const uint64_t at = little_endian(b, eocd - 12, 8);
  if (at + 56 > eocd - 20 || b.compare(at, 4, "PK\x06\x06") != 0) return "a damaged zip64 directory record";
  const uint64_t entries64 = little_endian(b, at + 32, 8), size64 = little_endian(b, at + 40, 8),
                 offset64 = little_endian(b, at + 48, 8);
  if ((entries != 0xFFFF && entries != entries64) || (dir_size != kMax32 && dir_size != size64) ||
      (dir_offset != kMax32 && dir_offset != offset64) || little_endian(b, at + 24, 8) != entries64) {
    return "zip64 records that disagree with the zip's end record";
  }
  entries = entries64;
  dir_size = size64;
  dir_offset = offset64;
  if (dir_offset > b.size() || dir_size > b.size() - dir_offset) return "a central directory outside the file";
  size_t p = dir_offset;
  for (uint64_t k = 0; k < entries; ++k) {
    if (p + 46 > b.size() || b.compare(p, 4, "PK\x01\x02") != 0) return "a damaged central directory";
    const uint64_t method = little_endian(b, p + 10, 2), crc = little_endian(b, p + 16, 4);
    uint64_t size = little_endian(b, p + 20, 4), offset = little_endian(b, p + 42, 4);
    const uint64_t name = little_endian(b, p + 28, 2), extra = little_endian(b, p + 30, 2),
                   comment = little_endian(b, p + 32, 2);
    if (p + 46 + name + extra + comment > b.size()) return "a damaged central directory";
    // zip64 sizes and offsets live in the extra field (id 1), in this order, when the 32-bit ones are full.
    for (size_t e = p + 46 + name; e + 4 <= p + 46 + name + extra;) {
      const uint64_t id = little_endian(b, e, 2), len = little_endian(b, e + 2, 2);
      size_t f = e + 4;
      if (id == 1) {
        if (size == kMax32 && f + 8 <= e + 4 + len) size = little_endian(b, f, 8), f += 8;  // uncompressed
        if (little_endian(b, p + 20, 4) == kMax32 && f + 8 <= e + 4 + len) f += 8;          // compressed
        if (offset == kMax32 && f + 8 <= e + 4 + len) offset = little_endian(b, f, 8);
      }
      e += 4 + len;
    }
    if (method != 0 && method != 8) return "a record of an unknown compression method";
    if (offset + 30 > b.size() || b.compare(offset, 4, "PK\x03\x04") != 0) return "a damaged record header";
    // The local header must repeat the central directory's version, flags, method and name; its CRC
    // and sizes are the central ones, or zero when a data descriptor follows (flag bit 3).
    const uint64_t local_name = little_endian(b, offset + 26, 2), local_extra = little_endian(b, offset + 28, 2);
    if (offset + 30 + local_name + local_extra > b.size() || b.compare(offset + 4, 6, b, p + 6, 6) != 0 ||
        local_name != name || b.compare(offset + 30, name, b, p + 46, name) != 0) {
      return "a record header that disagrees with the central directory";
    }
    const bool descriptor = (little_endian(b, offset + 6, 2) & 8) != 0;
    for (int f = 0; f < 3; ++f) {
      const uint64_t local = little_endian(b, offset + 14 + 4 * f, 4), central = little_endian(b, p + 16 + 4 * f, 4);
      if (local != central && !(descriptor && local == 0)) return "a record header that disagrees with the central directory";
    }
    // LibTorch aligns each record with an extra field "FB" of 'Z' bytes.
    for (size_t e = offset + 30 + name; e + 4 <= offset + 30 + name + local_extra;) {
      const uint64_t id = little_endian(b, e, 2), len = little_endian(b, e + 2, 2);
      if (e + 4 + len > offset + 30 + name + local_extra) return "a damaged record header";
      if (id == 0x4246 && b.find_first_not_of('Z', e + 4) < e + 4 + len) return "damaged padding in a record header";
      e += 4 + len;
    }
    const uint64_t data = offset + 30 + local_name + local_extra;
    if (data > b.size() || size > b.size() - data) return "a record outside the file";
    if (method == 0 && crc32_bytes(b.data() + data, size) != crc) return "a record whose checksum does not match";
    if (method == 8 && !inflated_crc_matches(b.data() + data, size, little_endian(b, p + 24, 4), crc)) {
      return "a compressed record whose checksum does not match";
    }
    // The data descriptor after the record (flag bit 3; "PK\7\8" optional) repeats its CRC-32 and sizes, in 4 or
    // 8 bytes each; the readers ignore it, but a damaged one is a damaged file.
    if (descriptor) {
      size_t d = data + size;
      if (d + 4 <= b.size() && b.compare(d, 4, "PK\x07\x08") == 0) d += 4;
      if (d + 12 > b.size() || little_endian(b, d, 4) != crc) return "a damaged data descriptor";
      const uint64_t c32 = little_endian(b, p + 20, 4), u32 = little_endian(b, p + 24, 4);
      const bool narrow = little_endian(b, d + 4, 4) == c32 && little_endian(b, d + 8, 4) == u32;
      const bool wide = d + 20 <= b.size() && little_endian(b, d + 4, 8) == c32 && little_endian(b, d + 12, 8) == u32;
      if (c32 != kMax32 && u32 != kMax32 && !narrow && !wide) return "a damaged data descriptor";
    }
    p += 46 + name + extra + comment;
  }
  return "";
}


uint32_t crc32_bytes(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const Bytef*>(data);
  uLong c = crc;
  while (n > 0) {  // zlib takes 32-bit lengths
    const size_t chunk = std::min<size_t>(n, 1u << 30);
    c = ::crc32(c, p, static_cast<uInt>(chunk));
    p += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(c);
}

}  // namespace tilt
