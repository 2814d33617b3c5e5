#pragma once
#include <pybind11/pybind11.h>

namespace fxk {

struct CpuFeatures {
  bool avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512vnni, avxvnni;
};

// Read once; kernels branch on these so the module never executes an unsupported instruction.
const CpuFeatures& cpu_features();
// AMX-INT8 tiles present and their state granted to this process by the OS (kernels_amx.cpp).
bool amx_usable();
pybind11::dict cpu_features_dict();

}  // namespace fxk
