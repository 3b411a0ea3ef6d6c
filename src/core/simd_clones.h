// Private to the library: TILT_SIMD_CLONES compiles a function once per instruction set and picks the copy at load
// time (GCC's ifunc resolver), so that the hand-written loops of the SiLU and pair kernels vectorise for the
// machine they run on. Elsewhere (clang, other architectures) it is empty: one portable copy.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TILT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TILT_SIMD_CLONES
#endif
