// Every kernel source, compiled for the emulator (STRATA_EMULATOR makes common.cuh pull the shim).
#include "../../../kernels/layer_sum.cu"
#include "../../../kernels/adamw.cu"
#include "../../../kernels/selftest.cu"
#include "../../../kernels/hconv.cu"
#include "../../../kernels/ctc.cu"
#include "../../../kernels/cross_entropy.cu"
#include "../../../kernels/softmax.cu"
#include "../../../kernels/pooling.cu"
