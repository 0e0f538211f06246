// Chunkwise-parallel fast-weight rules (delta rule, sum rule): the launch interface between the torch
// binding (binding.cpp) and the kernels (fast_weight.cu).  Plain pointers and sizes, no torch types, so
// that the kernels compile without torch's headers.
//
// Layouts (all contiguous):  q, k [B, H, T, Dk];  v, o, do [B, H, T, Dv]  (element type `dtype`, the same for
// all of them);  beta [B, H, T] fp32;  states [B, H, Dk, Dv] fp32.  Workspaces are fp32, allocated by the
// caller with the sizes given by fw_workspace_sizes (time padded to a multiple of the chunk length).
#pragma once

#include <cstdint>
#include <string>

#include "../common/mt_cuda.h"

namespace mt {

struct FwShape {
  int BH;      // batch x heads
  int T;       // sequence length
  int Dk, Dv;  // key and value head sizes
  int chunk;   // chunk length C (32 or 64)
  bool delta;  // delta rule (true) or sum rule (false)
  DType dtype; // element type of q, k, v, o, do
  float scale; // output scale
};

// Sizes in floats of the fp32 workspaces (0 when unused by the rule).
struct FwWorkspace {
  int64_t w, u, p, t;     // forward: W' = T beta K [BH, Tp, Dk], U' = T beta V [BH, Tp, Dv], P, T [BH, n, C, C]
  int64_t states, vnew;   // backward: entering states [BH, n, Dk, Dv], U = U' - W' S [BH, Tp, Dv]
  int64_t dstates, du;    // backward: state gradients [BH, n, Dk, Dv], dU [BH, Tp, Dv]
};
FwWorkspace fw_workspace_sizes(const FwShape& s, bool backward);

struct FwForwardArgs {
  const void *q, *k, *v;
  const float* beta;     // delta rule only
  const float* s0;       // initial state or nullptr (zeros)
  void* o;               // [B, H, T, Dv], dtype
  float* final_state;    // or nullptr
  float *ws_w, *ws_u, *ws_p;  // workspaces (ws_w, ws_u: delta rule only)
};

struct FwBackwardArgs {
  const void *q, *k, *v, *d_o;
  const float* beta;
  const float* s0;
  const float* d_final;  // gradient of the final state, or nullptr (zeros)
  float *dq, *dk, *dv;   // fp32 [B, H, T, Dk|Dv]; for the sum rule dv is written into ws_du (dv = dU) and dq, dk here
  float* dbeta;          // fp32 [B, H, T], delta rule only
  float* ds0;            // fp32 [B, H, Dk, Dv] or nullptr
  float *ws_w, *ws_u, *ws_p, *ws_t, *ws_states, *ws_vnew, *ws_dstates, *ws_du;
};

// Each returns "" or an error text.  `stream` is a cudaStream_t (ignored when emulated).
std::string fw_forward(const FwShape& s, const FwForwardArgs& a, void* stream);
std::string fw_backward(const FwShape& s, const FwBackwardArgs& a, void* stream);

}  // namespace mt
