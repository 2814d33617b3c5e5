// fxkernels._C: CPU kernels. Functions take and return torch tensors; argument checks print shapes.
#include <torch/extension.h>

#include "cpu/cpu_features.h"
#include "cpu/kernels_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fxkernels CPU kernels";
  m.def("cpu_features", &fxk::cpu_features_dict,
        "dict of the SIMD features this CPU supports (avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512vnni, avxvnni, amx_int8)");
  m.def("set_isa", &fxk::set_isa, py::arg("isa"),
        "'auto' (the best the CPU has), 'avx512amx', 'avx512vnni' (no AMX), 'avx2' (no VNNI) or 'scalar' (portable fallback)");
  m.def("active_isa", &fxk::active_isa, "the instruction set the kernels use now: 'avx512amx', 'avx512vnni', 'avx2' or 'scalar'");
  m.def("quantize_act", &fxk::quantize_act, py::arg("x"), py::arg("scale"), py::arg("zero"),
        "x fp32/fp16/bf16 [M,K] -> (xq int8 [M,K], scale fp32 [M], zero int32 [M]); static per-tensor if "
        "scale/zero ([1]) are given, dynamic per-token otherwise");
  m.def("repack_dequant", &fxk::repack_dequant, py::arg("qweight"), py::arg("scale"), py::arg("zero"),
        py::arg("bits"), py::arg("in_features"), "one-time repack for dequant_linear (rows in SIMD lanes)");
  m.def("repack_qact", &fxk::repack_qact, py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("wsum"),
        py::arg("bits"), py::arg("in_features"), "one-time repack for qact_linear (rows in lanes, k pairs)");
  m.def("dequant_linear", &fxk::dequant_linear, py::arg("x"), py::arg("qweight"), py::arg("scale"),
        py::arg("zero"), py::arg("packed"), py::arg("bias"), py::arg("bits"), py::arg("in_features"),
        "y = x @ dequant(W).T + bias; packed from repack_dequant (empty: scalar kernel)");
  m.def("read_probe", &fxk::read_probe, py::arg("buf"),
        "XOR fold of a contiguous CPU tensor's bytes as 64-bit words, read in parallel (a memory read-bandwidth probe; the value only keeps the reads alive)");
  m.def("huge_page_buffer", &fxk::huge_page_buffer, py::arg("nbytes"),
        "uint8 [nbytes] filled with 1, in 2 MiB transparent huge pages where the OS allows (probe buffer)");
  m.def("qact_linear", &fxk::qact_linear, py::arg("xq"), py::arg("x_scale"), py::arg("x_zero"),
        py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("wsum"), py::arg("packed"), py::arg("bias"),
        py::arg("bits"), py::arg("out_dtype"),
        "integer GEMM with exact zero-point corrections; packed from repack_qact (empty: scalar kernel)");
}
