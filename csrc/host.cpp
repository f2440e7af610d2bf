// Host-side helpers of fastres._C, called from Python on every forward (no GPU work).
//
// The inference plan's per-forward check that the model's parameters and buffers are unchanged
// (fastres/plan.py, _PlanCache.valid_for): slots_hold checks that every module slot still holds
// the tensor the plan was folded from, tensor_state reads every tensor's version counter and
// data pointer. In Python those are a dict lookup per slot and two attribute reads per tensor,
// ~13 and ~65 us for ResNet-50's 373 slots and 320 tensors; here each is one call.

#include "host.h"

#include <cstdint>
#include <exception>
#include <vector>

#include <torch/csrc/autograd/python_variable.h>

namespace fastres {

// tensor_state(tensors: list[Tensor]) -> bytes
//
// For each tensor, its version counter (-1 for an inference tensor, which has none) and the
// address of its data, as two int64 values, concatenated: two calls give equal bytes exactly
// when every tensor has the same version and data pointer in both. Raises TypeError for an
// element that is not a tensor and RuntimeError for a tensor without storage; the caller then
// keeps its Python check.
PyObject* tensor_state(PyObject* /*self*/, PyObject* arg) {
  if (!PyList_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "tensor_state expects a list of tensors, got %s",
                 Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(arg);
  std::vector<int64_t> state(static_cast<size_t>(2 * n));
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(arg, i);
      if (!THPVariable_Check(item)) {
        PyErr_Format(PyExc_TypeError, "tensor_state: element %zd is a %s, not a tensor", i,
                     Py_TYPE(item)->tp_name);
        return nullptr;
      }
      const at::Tensor& t = THPVariable_Unpack(item);
      state[2 * i] = t.is_inference() ? -1 : static_cast<int64_t>(t._version());
      state[2 * i + 1] = reinterpret_cast<int64_t>(t.data_ptr());
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(state.data()),
                                   static_cast<Py_ssize_t>(state.size() * sizeof(int64_t)));
}

// slots_hold(dicts: list[dict], names: list[str], held: list) -> bool
//
// True when every dicts[i].get(names[i]) is held[i] (by identity; a missing name reads as
// None), as dict.get reads it (a dict subclass's own __getitem__ is not called). Raises
// TypeError for an element of dicts that is not a dict, ValueError for lists of different
// lengths.
PyObject* slots_hold(PyObject* /*self*/, PyObject* args) {
  PyObject *dicts, *names, *held;
  if (!PyArg_ParseTuple(args, "O!O!O!:slots_hold", &PyList_Type, &dicts, &PyList_Type, &names,
                        &PyList_Type, &held)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  if (PyList_GET_SIZE(names) != n || PyList_GET_SIZE(held) != n) {
    PyErr_Format(PyExc_ValueError, "slots_hold: lists of %zd, %zd and %zd elements", n,
                 PyList_GET_SIZE(names), PyList_GET_SIZE(held));
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(dicts, i);
    if (!PyDict_Check(d)) {
      PyErr_Format(PyExc_TypeError, "slots_hold: element %zd of dicts is a %s, not a dict", i,
                   Py_TYPE(d)->tp_name);
      return nullptr;
    }
    // A lookup can run Python code (a key's __eq__ or __hash__, for a name or a key that is
    // not a plain str), which may change the lists: the dict and the name are held across it,
    // and the lists are read again only while they still have n elements (else: not held).
    PyObject* name = PyList_GET_ITEM(names, i);
    Py_INCREF(d);
    Py_INCREF(name);
    PyObject* v = PyDict_GetItemWithError(d, name);  // borrowed (compared, never read)
    const bool failed = v == nullptr && PyErr_Occurred();
    Py_DECREF(name);
    Py_DECREF(d);
    if (failed) return nullptr;  // (an unhashable name)
    if (v == nullptr) v = Py_None;
    if (PyList_GET_SIZE(dicts) != n || PyList_GET_SIZE(names) != n ||
        PyList_GET_SIZE(held) != n || v != PyList_GET_ITEM(held, i)) {
      Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

}  // namespace fastres
