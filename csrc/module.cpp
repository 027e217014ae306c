// The op schemas (one namespace, one schema per op; cpu_kernels.cpp and cuda_kernels.cu register
// the backends) and an empty Python module, so that `import selectivity._C` loads this library and
// runs the registrations. Nothing here uses the Python C API beyond creating that module, which
// lets the .so be built against the stable ABI (one build for every Python >= 3.9).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                          // name
      "Registers torch.ops.selectivity.*; use selectivity.ops, not this module.",  // doc
      -1,                                            // no per-interpreter state
      nullptr,                                       // no methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(selectivity, m) {
  // Fake (meta) implementations for torch.compile / opcheck live in Python; torch imports this
  // module to find them if they are needed before selectivity.ops was imported.
  m.set_python_module("selectivity.ops");
  // sums[K, U] float64 and counts[K] int64 are updated in place.
  m.def("accumulate(Tensor act, Tensor labels, Tensor(a!) sums, Tensor(b!) counts) -> ()");
  m.def(
      "selectivity_index(Tensor sums, Tensor counts, float eps) "
      "-> (Tensor si, Tensor pref_class, Tensor mu_max, Tensor mu_rest)");
}
