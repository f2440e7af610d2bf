// Host-side helpers of fastres._C exposed as module functions (host.cpp).
#pragma once

#include <Python.h>

namespace fastres {

// fastres._C.tensor_state(tensors: list[Tensor]) -> bytes (see host.cpp)
PyObject* tensor_state(PyObject* self, PyObject* arg);

// fastres._C.slots_hold(dicts: list[dict], names: list[str], held: list) -> bool (host.cpp)
PyObject* slots_hold(PyObject* self, PyObject* args);

}  // namespace fastres
