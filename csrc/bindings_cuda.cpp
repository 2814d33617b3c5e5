// fxkernels._cuda: INT8 tensor-core GEMM with fused dequantization epilogue, activation
// quantization, and host-side checks of the kernels' index/epilogue math.
//
// Built against CPU or CUDA torch alike: only torch's generic tensor API and the CUDA runtime
// are used here (no c10::cuda), the caller passes the stream as an integer handle and
// preallocates outputs, so the module also builds and imports on a GPU-less machine.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <string>

#include "cuda/fxk_gemm.h"
#include "cuda/host_check.h"

namespace {

using at::Tensor;
using c10::optional;

void check_cuda_status(int rc, const char* what) {
  if (rc == 0) return;
  if (rc < 0) TORCH_CHECK(false, what, ": invalid configuration or output kind (internal error ", rc, ")");
  TORCH_CHECK(false, what, ": CUDA error ", rc, " (", cudaGetErrorString(static_cast<cudaError_t>(rc)), ")");
}

void check_device(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": tensor on ", t.device(),
              "; expected a CUDA tensor (fxkernels._cuda runs on NVIDIA GPUs with compute capability >= 8.0)");
}

void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype, const Tensor& like) {
  check_device(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": dtype ", t.scalar_type(), "; expected ", dtype);
  TORCH_CHECK(t.device() == like.device(), name, ": on ", t.device(), "; expected ", like.device(), " like a");
  TORCH_CHECK(t.is_contiguous(), name, ": strides ", t.strides(), "; expected a contiguous tensor");
}

// A vector operand of length `len` or 1 (broadcast, stride 0).
int vec_stride(const Tensor& t, const char* name, int64_t len, const char* what) {
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == len || t.size(0) == 1), name, ": shape ", t.sizes(), "; expected [",
              len, "] (", what, ") or [1] (per-tensor)");
  return t.size(0) == 1 && len != 1 ? 0 : 1;
}

// Makes the tensors' device current for the launch (the CUDA runtime launches on the current
// device) and restores the caller's device afterwards.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(const Tensor& t) {
    cudaGetDevice(&prev);
    const int want = t.device().index();
    if (want >= 0 && want != prev) check_cuda_status(cudaSetDevice(want), "cudaSetDevice");
    else prev = -1;
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

void int8_gemm(const Tensor& a, const Tensor& b, const Tensor& out, const optional<Tensor>& x_scale,
               const optional<Tensor>& x_zero, const optional<Tensor>& w_scale, const optional<Tensor>& w_zero,
               int64_t zero_offset, const optional<Tensor>& wsum, const optional<Tensor>& bias, bool need_xsum,
               int64_t config, int64_t num_sms, int64_t stream) {
  check_device(a, "a");
  TORCH_CHECK(a.scalar_type() == at::kChar && a.dim() == 2, "a: ", a.scalar_type(), " ", a.sizes(),
              "; expected int8 [M, K]");
  check_tensor(a, "a", at::kChar, a);
  check_tensor(b, "b", at::kChar, a);
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK(b.dim() == 2 && b.size(1) == k, "b: shape ", b.sizes(), "; expected [N, K=", k, "]");
  const int64_t n = b.size(0);
  TORCH_CHECK(k % 16 == 0 && k > 0, "K: got ", k, "; expected a positive multiple of 16 (16-byte cp.async chunks)");
  TORCH_CHECK(m < (1LL << 31) && n < (1LL << 31), "M, N: got ", m, ", ", n, "; expected < 2^31");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0, "a: data pointer not 16-byte aligned; expected "
              "an aligned tensor (cp.async moves 16-byte chunks)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0, "b: data pointer not 16-byte aligned; expected "
              "an aligned tensor (cp.async moves 16-byte chunks)");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n, "out: shape ", out.sizes(), "; expected [",
              m, ", ", n, "]");
  int out_kind;
  switch (out.scalar_type()) {
    case at::kInt: out_kind = fxk::kOutI32; break;
    case at::kFloat: out_kind = fxk::kOutF32; break;
    case at::kHalf: out_kind = fxk::kOutF16; break;
    case at::kBFloat16: out_kind = fxk::kOutBF16; break;
    default: TORCH_CHECK(false, "out: dtype ", out.scalar_type(), "; expected int32, float32, float16 or bfloat16");
  }
  check_tensor(out, "out", out.scalar_type(), a);

  fxk::GemmArgs p{};
  p.a = static_cast<const int8_t*>(a.data_ptr());
  p.b = static_cast<const int8_t*>(b.data_ptr());
  p.c = out.data_ptr();
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.zero_offset = static_cast<int>(zero_offset);
  if (out_kind == fxk::kOutI32) {
    TORCH_CHECK(k <= 131072, "K: got ", k, "; expected <= 131072 so int32 accumulators cannot overflow");
    TORCH_CHECK(!x_scale && !x_zero && !w_scale && !w_zero && !wsum && !bias,
                "out: int32 output returns raw accumulators; expected no epilogue operands");
  } else {
    TORCH_CHECK(k <= 32768, "K: got ", k, "; expected <= 32768 so the zero-point-corrected int32 sum is exact");
    TORCH_CHECK(x_scale && w_scale, "x_scale, w_scale: required for a float output");
    check_tensor(*x_scale, "x_scale", at::kFloat, a);
    p.x_scale = x_scale->data_ptr<float>();
    p.x_scale_stride = vec_stride(*x_scale, "x_scale", m, "per-token");
    check_tensor(*w_scale, "w_scale", at::kFloat, a);
    p.w_scale = w_scale->data_ptr<float>();
    p.w_scale_stride = vec_stride(*w_scale, "w_scale", n, "per-channel");
    if (x_zero) {
      check_tensor(*x_zero, "x_zero", at::kInt, a);
      p.x_zero = x_zero->data_ptr<int32_t>();
      p.x_zero_stride = vec_stride(*x_zero, "x_zero", m, "per-token");
      TORCH_CHECK(wsum.has_value(), "wsum: required when x_zero is given (the -za * sum_k c correction)");
    }
    if (w_zero) {
      check_tensor(*w_zero, "w_zero", at::kInt, a);
      p.w_zero = w_zero->data_ptr<int32_t>();
      p.w_zero_stride = vec_stride(*w_zero, "w_zero", n, "per-channel");
    }
    if (wsum) {
      check_tensor(*wsum, "wsum", at::kInt, a);
      p.wsum = wsum->data_ptr<int32_t>();
      p.wsum_stride = vec_stride(*wsum, "wsum", n, "per-channel");
    }
    if (bias) {
      check_tensor(*bias, "bias", at::kFloat, a);
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias: shape ", bias->sizes(), "; expected [", n, "]");
      p.bias = bias->data_ptr<float>();
    }
  }
  if (config < 0) config = fxk::pick_config(p.m, p.n, static_cast<int>(num_sms));
  TORCH_CHECK(config < fxk::kNumConfigs, "config: got ", config, "; expected -1 (auto) or 0..", fxk::kNumConfigs - 1);
  if (m == 0 || n == 0) return;
  DeviceGuard guard(a);
  check_cuda_status(fxk::launch_int8_gemm(p, static_cast<int>(config), out_kind, need_xsum, stream), "int8_gemm");
}

void quantize_act(const Tensor& x, const Tensor& xq, const Tensor& scale_out, const Tensor& zero_out,
                  const optional<Tensor>& static_scale, const optional<Tensor>& static_zero, int64_t stream) {
  check_device(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: shape ", x.sizes(), "; expected [M, K]");
  int dtype;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = 0; break;
    case at::kHalf: dtype = 1; break;
    case at::kBFloat16: dtype = 2; break;
    default: TORCH_CHECK(false, "x: dtype ", x.scalar_type(), "; expected float32, float16 or bfloat16");
  }
  check_tensor(x, "x", x.scalar_type(), x);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m < (1LL << 31) && k < (1LL << 31), "x: shape ", x.sizes(), "; expected dimensions < 2^31");
  check_tensor(xq, "xq", at::kChar, x);
  TORCH_CHECK(xq.sizes() == x.sizes(), "xq: shape ", xq.sizes(), "; expected ", x.sizes());
  check_tensor(scale_out, "scale_out", at::kFloat, x);
  check_tensor(zero_out, "zero_out", at::kInt, x);
  TORCH_CHECK(scale_out.dim() == 1 && scale_out.size(0) == m, "scale_out: shape ", scale_out.sizes(), "; expected [", m, "]");
  TORCH_CHECK(zero_out.dim() == 1 && zero_out.size(0) == m, "zero_out: shape ", zero_out.sizes(), "; expected [", m, "]");
  TORCH_CHECK(static_scale.has_value() == static_zero.has_value(),
              "static_scale/static_zero: got only one; expected both (static) or neither (dynamic)");
  const float* ss = nullptr;
  const int32_t* sz = nullptr;
  if (static_scale) {
    check_tensor(*static_scale, "static_scale", at::kFloat, x);
    check_tensor(*static_zero, "static_zero", at::kInt, x);
    TORCH_CHECK(static_scale->numel() == 1 && static_zero->numel() == 1, "static_scale/static_zero: ",
                static_scale->sizes(), "/", static_zero->sizes(), "; expected one element each");
    ss = static_scale->data_ptr<float>();
    sz = static_zero->data_ptr<int32_t>();
  }
  if (m == 0) return;
  DeviceGuard guard(x);
  check_cuda_status(fxk::launch_quantize_act(x.data_ptr(), dtype, static_cast<int>(m), static_cast<int>(k),
                                             static_cast<int8_t*>(xq.data_ptr()), scale_out.data_ptr<float>(),
                                             zero_out.data_ptr<int32_t>(), ss, sz, stream),
                    "quantize_act");
}

py::dict runtime_info() {
  py::dict d;
  int rt = 0;
  cudaError_t e = cudaRuntimeGetVersion(&rt);
  d["runtime_version"] = e == cudaSuccess ? rt : -1;
  int count = 0;
  e = cudaGetDeviceCount(&count);
  d["device_count"] = e == cudaSuccess ? count : 0;
  d["device_error"] = e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
  cudaGetLastError();  // do not leave a sticky "no device" error for the next call
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fxkernels CUDA kernels: INT8 tensor-core GEMM with fused dequantization epilogue, activation quantization";
  m.def("int8_gemm", &int8_gemm, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("x_scale"), py::arg("x_zero"),
        py::arg("w_scale"), py::arg("w_zero"), py::arg("zero_offset"), py::arg("wsum"), py::arg("bias"),
        py::arg("need_xsum"), py::arg("config"), py::arg("num_sms"), py::arg("stream"),
        "out[M,N] = epilogue(a[M,K] int8 . b[N,K]^T int8). out int32: raw accumulators (no epilogue operands). "
        "out fp32/fp16/bf16: x_scale[M|1] * w_scale[N|1] * (acc - za*wsum - zs*xsum + K*za*zs) + bias, "
        "zs = w_zero - zero_offset; need_xsum=False asserts every zs is 0. config -1 picks a tile shape; "
        "stream: cudaStream_t as int.");
  m.def("quantize_act", &quantize_act, py::arg("x"), py::arg("xq"), py::arg("scale_out"), py::arg("zero_out"),
        py::arg("static_scale"), py::arg("static_zero"), py::arg("stream"),
        "int8 activation codes into xq / scale_out / zero_out (dynamic per-token, or static per-tensor)");
  m.def("runtime_info", &runtime_info, "CUDA runtime version and visible device count (or the error)");
  m.def("pick_config", &fxk::pick_config, py::arg("m"), py::arg("n"), py::arg("num_sms"));
  m.def("config_name", &fxk::config_name, py::arg("config"));
  m.attr("num_configs") = fxk::kNumConfigs;
  m.def("host_simulate_gemm", &fxk::host::simulate_gemm, py::arg("a"), py::arg("b"), py::arg("config"));
  m.def("host_epilogue", &fxk::host::epilogue, py::arg("acc"), py::arg("xsum"), py::arg("x_scale"),
        py::arg("x_zero"), py::arg("w_scale"), py::arg("w_zero"), py::arg("zero_offset"), py::arg("wsum"),
        py::arg("bias"), py::arg("k"));
  m.def("host_quantize_act", &fxk::host::quantize_act, py::arg("x"), py::arg("scale"), py::arg("zero"));
  m.def("host_tile_order", &fxk::host::tile_order, py::arg("grid_m"), py::arg("grid_n"), py::arg("group_m"));
  m.def("host_config_shape", &fxk::host::config_shape, py::arg("config"));
}
