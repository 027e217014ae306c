// Schema of index_cache: the per-unit mu_max / preferred class / sum of class means / runner-up / group maxima of one row of a
// tiled state (sums [tiles, K, T], counts [K]) from scratch, into cache [4 + G, tiles * T]: the full
// reduction, and what accumulate_means keeps up to date incrementally. Kernels: cpu/, cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(selectivity, m) {
  m.def("index_cache(Tensor sums, Tensor counts, Tensor(a!) cache) -> ()");
}
