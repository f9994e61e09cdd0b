// Shared macros for ncutfast._C: the host/device qualifier, argument checks, dtype dispatch.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define NCUT_HD __host__ __device__ __forceinline__
#else
#define NCUT_HD inline
#endif

namespace ncutfast {

/// Element type of a similarity or feature buffer passed by pointer from Python.
enum class DType { Float32, Float64 };

/// Parse the dtype names the Python side passes ("float32" / "float64"); raises naming `arg`.
inline DType parse_dtype(const std::string& name, const char* arg) {
  if (name == "float32") return DType::Float32;
  if (name == "float64") return DType::Float64;
  throw std::invalid_argument(std::string(arg) + ": expected 'float32' or 'float64', got '" + name + "'");
}

}  // namespace ncutfast

/// Raise std::invalid_argument (ValueError in Python) with a message that names the argument.
#define NCUT_CHECK(cond, arg, msg)                                  \
  do {                                                              \
    if (!(cond)) {                                                  \
      std::ostringstream ncut_os_;                                  \
      ncut_os_ << arg << ": " << msg;                               \
      throw std::invalid_argument(ncut_os_.str());                  \
    }                                                               \
  } while (0)

#define NCUT_CHECK_PTR(ptr, arg) NCUT_CHECK((ptr) != 0, arg, "null pointer")

/// Run `...` with `scalar_t` bound to float or double according to a DType.
#define NCUT_DISPATCH_FLOAT(dtype, ...)        \
  do {                                         \
    if ((dtype) == ::ncutfast::DType::Float32) { \
      using scalar_t = float;                  \
      __VA_ARGS__();                           \
    } else {                                   \
      using scalar_t = double;                 \
      __VA_ARGS__();                           \
    }                                          \
  } while (0)
