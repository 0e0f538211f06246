// Attention with Transformer-XL relative positions over [memory ; segment], flash-style: the launch
// interface between the torch binding (binding.cpp) and the kernels (rel_attention.cu).  Plain pointers and
// sizes, no torch types.
//
// Score of query i and key j (pretrain/ops/rel_attention/naive.py is the reference):
//
//   s_ij = qu_i . k_j + qv_i . r_{r_offset + j - i}       (qu = q + u, qv = q + w: the caller adds the biases)
//
// visible iff   order: past:   j <= q_start + i   (query i sits at key index q_start + i)
//                      future: j >  q_start + i   (LaMemo's causal look-ahead)
//                      none:   no order constraint
//          and  window > 0  =>  q_start + i - j < window          (XL's same_length)
//          and  key_start   =>  j >= key_start[b]                 (empty memory slots)
//          and  q_doc/k_doc =>  q_doc[b, i] == k_doc[b, j]        (documents inside the segment)
//
// o_i = sum_j softmax_j(s_ij) v_j, lse_i = log sum_j exp(s_ij) over the visible keys (a row with none:
// o = 0, lse = -inf).  Position rows outside [0, P) read as zeros; the caller guarantees that visible pairs
// never need them.
//
// Layouts (contiguous): qu, qv, o, do [H, B, R, D]; k, v [H, B, Ck, D]; r [H, P, D] (element type dtype);
// lse, dl [H, B, R] fp32; key_start [B], q_doc [B, R], k_doc [B, Ck] int32.  Gradients are fp32; dr must be
// zero-filled by the caller (it is accumulated with atomics).
#pragma once

#include <string>

#include "../common/mt_cuda.h"

namespace mt {

enum class Order : int { kNone = 0, kPast = 1, kFuture = 2 };

struct RelAttnShape {
  int H, B, R, Ck, P, D;
  int r_offset, q_start;
  Order order;
  int window;
  DType dtype;
};

struct RelAttnMaskArgs {
  const int* key_start;  // [B] or nullptr
  const int* q_doc;      // [B, R] or nullptr (then k_doc is nullptr too)
  const int* k_doc;      // [B, Ck]
};

struct RelAttnForwardArgs {
  const void *qu, *qv, *k, *v, *r;
  RelAttnMaskArgs mask;
  void* o;
  float* lse;
};

struct RelAttnBackwardArgs {
  const void *qu, *qv, *k, *v, *r, *d_o;
  const float* lse;
  const float* dl;  // rowsum(dO * O) - dlse  [H, B, R]
  RelAttnMaskArgs mask;
  float *dqu, *dqv, *dk, *dv, *dr;
};

// Largest head size the kernels take.
constexpr int kRelAttnMaxHead = 128;

std::string rel_attn_forward(const RelAttnShape& s, const RelAttnForwardArgs& a, void* stream);
std::string rel_attn_backward(const RelAttnShape& s, const RelAttnBackwardArgs& a, void* stream);

}  // namespace mt
