// The CPU kernels as torch operators (namespace fxk_cpu), so that compiled graphs
// (torch.compile / inductor, torch.export) call them through the dispatcher with no Python in
// between. Their fake (shape) implementations live in fxkernels/backends/cpu.py. The argument
// conventions are those of the pybind11 functions in bindings_cpu.cpp; `packed` is the repacked
// weight list those functions take (from repack_dequant / repack_qact, prepared at load time).
#include <torch/library.h>

#include <tuple>

#include "cpu/kernels_cpu.h"

namespace {

at::Tensor dequant_linear_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                             const at::Tensor& zero, at::TensorList packed, const c10::optional<at::Tensor>& bias,
                             int64_t bits, int64_t in_features) {
  return fxk::dequant_linear(x, qweight, scale, zero, packed.vec(), bias, bits, in_features);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_op(const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& scale,
                                                              const c10::optional<at::Tensor>& zero) {
  auto r = fxk::quantize_act(x, scale, zero);
  return {r[0], r[1], r[2]};
}

at::Tensor qact_linear_op(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& x_zero,
                          const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                          const at::Tensor& wsum, at::TensorList packed, const c10::optional<at::Tensor>& bias,
                          int64_t bits, at::ScalarType out_dtype) {
  return fxk::qact_linear(xq, x_scale, x_zero, qweight, scale, zero, wsum, packed.vec(), bias, bits, out_dtype);
}

at::Tensor decode_layer_op(const at::Tensor& h, const at::Tensor& norm1, double eps1, const at::Tensor& norm2,
                           double eps2, at::TensorList qkv, const c10::optional<at::Tensor>& qkv_bias,
                           at::TensorList o_proj, const c10::optional<at::Tensor>& o_bias, at::TensorList gate_up,
                           const c10::optional<at::Tensor>& gate_up_bias, at::TensorList down,
                           const c10::optional<at::Tensor>& down_bias, at::IntArrayRef dims, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& mask, const at::Tensor& slot, int64_t heads, int64_t window,
                           double scaling) {
  at::Tensor k = k_cache, v = v_cache;  // written in place (the schema marks them mutated)
  return fxk::decode_layer(h, norm1, eps1, norm2, eps2, qkv, qkv_bias, o_proj, o_bias, gate_up, gate_up_bias, down,
                           down_bias, dims, cos, sin, k, v, mask, slot, heads, window, scaling);
}

}  // namespace

TORCH_LIBRARY(fxk_cpu, m) {
  m.def("dequant_linear(Tensor x, Tensor qweight, Tensor scale, Tensor zero, Tensor[] packed, Tensor? bias, "
        "int bits, int in_features) -> Tensor");
  m.def("quantize_act(Tensor x, Tensor? scale, Tensor? zero) -> (Tensor, Tensor, Tensor)");
  m.def("qact_linear(Tensor xq, Tensor x_scale, Tensor x_zero, Tensor qweight, Tensor scale, Tensor zero, "
        "Tensor wsum, Tensor[] packed, Tensor? bias, int bits, ScalarType out_dtype) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor mask, Tensor slot, int window, "
        "float scaling, float? softcap) -> Tensor");
  m.def("decode_layer(Tensor h, Tensor norm1, float eps1, Tensor norm2, float eps2, Tensor[] qkv, Tensor? qkv_bias, "
        "Tensor[] o_proj, Tensor? o_bias, Tensor[] gate_up, Tensor? gate_up_bias, Tensor[] down, Tensor? down_bias, "
        "int[] dims, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor mask, Tensor slot, "
        "int heads, int window, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxk_cpu, CPU, m) {
  m.impl("dequant_linear", &dequant_linear_op);
  m.impl("quantize_act", &quantize_act_op);
  m.impl("qact_linear", &qact_linear_op);
  m.impl("decode_attention", &fxk::decode_attention);
  m.impl("decode_layer", &decode_layer_op);
}
