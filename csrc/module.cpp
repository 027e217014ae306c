// The library's Python module and its namespace. `import selectivity._C` loads this library, which
// runs every registration in it: each op declares its schema in csrc/ops/<op>/<op>.cpp
// (TORCH_LIBRARY_FRAGMENT) and registers its kernels in csrc/ops/<op>/cpu and csrc/ops/<op>/cuda
// (TORCH_LIBRARY_IMPL). Nothing here uses the Python C API beyond creating an empty module, which
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
}
