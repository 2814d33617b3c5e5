// fxkernels._C: CPU kernels. Functions take and return torch tensors; argument checks print shapes.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fxkernels CPU kernels";
  m.def("cpu_features", &fxk::cpu_features_dict,
        "dict of the SIMD features this CPU supports (avx2, fma, f16c, avx512f, avx512bw, avx512vnni, avxvnni)");
}
