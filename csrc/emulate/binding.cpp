// The torch binding compiled for the CPU block emulator (tests only; built with -DMT_EMULATE by
// pretrain/ops/kernels.py load_emulator).
#include "../binding.cpp"
