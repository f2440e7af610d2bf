// Formatting of shapes, value lists and devices for TORCH_CHECK messages (header-only).
#pragma once

#include <cstdio>
#include <string>

#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

namespace fastres {

// -- formatting for error messages ----------------------------------------------------------------
// Shapes, value lists and devices are formatted here instead of being streamed with c10's
// operator<<. On the H100 image (torch 2.11, GCC 13 through /opt/gcc's wrapper; ldd lists no
// libstdc++ for the built library, so the C++ runtime is linked into it) a TORCH_CHECK message
// that streamed an IntArrayRef crashed the process with SIGSEGV, while one that streamed only
// ScalarType and strings raised as it should. Building the strings ourselves keeps every error a
// Python RuntimeError on every toolchain.

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

inline std::string values_str(at::ArrayRef<double> values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) s += ", ";
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", values[i]);
    s += buf;
  }
  return s + "]";
}

inline std::string device_str(const c10::Device& d) {
  std::string s = d.is_cpu() ? "cpu" : d.is_cuda() ? "cuda"
                                                   : "device type " + std::to_string(static_cast<int>(d.type()));
  if (d.has_index()) s += ":" + std::to_string(static_cast<int>(d.index()));
  return s;
}

}  // namespace fastres
