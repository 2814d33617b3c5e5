// The AVX2 integer-activation kernels rebuilt with AVX-512 VNNI dot products (vpdpbusd on 256-bit
// registers) for INT4 weights x int8 activations; see the FXK_VNNI notes in kernels_avx2.cpp.
// The driver calls qa_tiles_avx512vnni only when cpu_features() reports AVX512F+VL+VNNI.
#define FXK_VNNI 1
#include "kernels_avx2.cpp"
