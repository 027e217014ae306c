// Schema of accumulate_means: one step of every tracked layer at once. means [B, N] float32 (the
// per-image means of all N tracked units), labels [R, B] int64 (row 0 the real labels, rows 1.. the
// null's), weight w (1, or the decayed state's current image weight). For every row r and image b:
// sums[r, :, labels[r, b], :] += w * means[b] (tiled, common/tiled_state.h), counts[r, labels[r, b]] += w.
// With a cache (row 0's per-unit mu_max / preferred class / sum of class means / bound of the others)
// the cache is brought up to date from the classes the step touched, rescanning the tiles where a
// preferred class fell below that bound;
// rescans[0] counts the units that went stale, rescans[1] the rescans (of a cache line
// of units on the CPU, of one unit on CUDA). Kernels: cpu/, cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(selectivity, m) {
  m.def(
      "accumulate_means(Tensor means, Tensor labels, float weight, Tensor(a!) sums, Tensor(b!) counts, "
      "Tensor(c!)? cache, Tensor(d!)? rescans) -> ()");
}
