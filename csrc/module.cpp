// fastkd._C: the Python module whose import registers every fastkd:: op (each op's source file
// holds its own TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks). The module itself only answers
// questions about the build.
#include <Python.h>
#include <torch/version.h>

#include "common.h"

namespace {

PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef FASTKD_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(TORCH_VERSION); }

PyObject* cpu_capability(PyObject*, PyObject*) {
#if defined(CPU_CAPABILITY_AVX512)
  return PyUnicode_FromString("AVX512");
#elif defined(CPU_CAPABILITY_AVX2)
  return PyUnicode_FromString("AVX2");
#else
  return PyUnicode_FromString("DEFAULT");
#endif
}

PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"torch_version", torch_version, METH_NOARGS, "The torch version the library was built against."},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The at::vec instruction set of the CPU kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastkd compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
