// The rel_attention kernels compiled as C++ for the CPU block emulator (tests only; built with -DMT_EMULATE by
// pretrain/ops/kernels.py load_emulator).
#include "../rel_attention/rel_attention.cu"
