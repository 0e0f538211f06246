// The fast_weight kernels compiled as C++ for the CPU block emulator (tests only; built with -DMT_EMULATE by
// pretrain/ops/kernels.py load_emulator).
#include "../fast_weight/fast_weight.cu"
