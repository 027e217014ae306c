// Schema of accumulate: sums[labels[b], u] += mean over pixels of act[b, u]; counts[labels[b]] += 1.
// sums [K, U] float64 and counts [K] int64 are updated in place. Kernels: cpu/, cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(selectivity, m) {
  m.def("accumulate(Tensor act, Tensor labels, Tensor(a!) sums, Tensor(b!) counts) -> ()");
}
