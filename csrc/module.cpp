// The Python module loralite._C. Importing it runs the static TORCH_LIBRARY registrations in
// the other sources; the operators are then reached as torch.ops.loralite.*.

#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "loralite's C++/CUDA operators", -1, nullptr};
  return PyModule_Create(&module);
}
