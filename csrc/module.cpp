// fastkd._C: the Python module whose import registers every fastkd:: op (each op's source file
// holds its own TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks). The module itself only answers
// questions about the build.
#include <Python.h>
#include <torch/version.h>

#include "cpu_dispatch.h"

#include <exception>

namespace {

PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef FASTKD_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(TORCH_VERSION); }

// The instruction-set level the CPU kernels run at ("default", "avx2", "avx512"); a bad
// FASTKD_CPU_CAPABILITY raises ValueError naming what this CPU supports.
PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fastkd::dispatch::level_name(fastkd::dispatch::active_level()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// The best level of this CPU, whether compiled or not.
PyObject* cpu_best_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastkd::dispatch::level_name(fastkd::dispatch::cpu_level()));
}

// The levels compiled into this library.
PyObject* cpu_built_capabilities(PyObject*, PyObject*) {
  const int top = static_cast<int>(fastkd::dispatch::built_level());
  PyObject* out = PyList_New(0);
  for (int i = 0; i <= top; ++i) {
    PyObject* name = PyUnicode_FromString(fastkd::dispatch::level_name(static_cast<fastkd::dispatch::Level>(i)));
    PyList_Append(out, name);
    Py_DECREF(name);
  }
  return out;
}

// Switch the level for this process (tests run every level); returns the previous level.
PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    return PyUnicode_FromString(fastkd::dispatch::level_name(fastkd::dispatch::set_active_level(name)));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"torch_version", torch_version, METH_NOARGS, "The torch version the library was built against."},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The instruction-set level the CPU kernels run at."},
    {"cpu_best_capability", cpu_best_capability, METH_NOARGS, "The best instruction-set level of this CPU."},
    {"cpu_built_capabilities", cpu_built_capabilities, METH_NOARGS, "The levels compiled into fastkd._C."},
    {"set_cpu_capability", set_cpu_capability, METH_O, "Run the CPU kernels at this level (returns the old one)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastkd compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
