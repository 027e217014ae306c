// Schema of accumulate_means: one step of every tracked layer at once. means [B, N] float32 (the
// per-image means of all N tracked units), labels [R, B] int64 (row 0 the real labels, rows 1.. the
// null's), weight w (1, or the decayed state's current image weight). For every row r and image b:
// sums[r, :, labels[r, b], :] += w * means[b] (tiled, common/tiled_state.h), counts[r, labels[r, b]] += w.
// With a cache (row 0's per-unit mu_max / preferred class / sum of class means / bounds of the other
// classes, common/tile_scan.h) the cache is brought up to date from the classes the step touched,
// rescanning the units whose preferred class fell below the others' bound; rescans[0] counts those
// units, rescans[1] the calls. Kernels: cpu/, cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(selectivity, m) {
  m.def(
      "accumulate_means(Tensor means, Tensor labels, float weight, Tensor(a!) sums, Tensor(b!) counts, "
      "Tensor(c!)? cache, Tensor(d!)? rescans) -> ()");
}
