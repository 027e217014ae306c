// Schema of selectivity_index: per unit of a [K, U] state, over the classes with counts > 0, the
// class-mean maximum (lowest class on ties), the mean of the other class means, and SI. Kernels: cpu/, cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(selectivity, m) {
  m.def(
      "selectivity_index(Tensor sums, Tensor counts, float eps) "
      "-> (Tensor si, Tensor pref_class, Tensor mu_max, Tensor mu_rest)");
}
