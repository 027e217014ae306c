// SELECTIVITY_HOT: how the CPU kernels' hot loops are compiled.
#pragma once

// One build for every x86-64 CPU: the hot loops are compiled three times, for baseline x86-64 (SSE2),
// x86-64-v3 (AVX2, FMA, F16C) and x86-64-v4 (AVX-512: 8 doubles a vector, and mask registers for the
// tracker's selects), and the dynamic loader picks one at startup (GNU ifunc). No -march flag, so
// the .so runs on any x86-64. Elsewhere (aarch64, macOS) the baseline is used.
// `flatten` inlines every helper into each clone: a helper the compiler chose not to inline was
// compiled once, for baseline x86-64, and ran its 8-float vectors as SSE2 pairs.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SELECTIVITY_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define SELECTIVITY_HOT
#endif
