// Chunkwise-parallel delta rule and sum rule, forward and backward (fp32 arithmetic, fp32 state).
//
// The algorithm is the one of pretrain/ops/fast_weight/chunk.py (Yang et al., "Parallelizing Linear
// Transformers with the Delta Rule over Sequence Length", NeurIPS 2024, Sec. 3: WY representation, UT
// transform), with the state W in R^{Dk x Dv}.  Per chunk of C positions with rows K, Q [C, Dk], V [C, Dv],
// beta [C] and entering state S:
//
//   A  = strictly_lower(diag(beta) K K^T),   T = (I + A)^{-1}          (forward substitution)
//   W' = T diag(beta) K,   U' = T diag(beta) V,   P = lower_incl(Q K^T)
//   U  = U' - W' S,   O = scale (Q S + P U),   S <- S + K^T U
// (sum rule: W' = 0, U = V).
//
// Kernels (256 threads per block; arithmetic in fp32 on shared-memory tiles, see common/tile.h):
//   fw_prep        grid (chunks, B*H)       A, T, W', U', P of every chunk (independent of the state)
//   fw_recurrent   grid (Dv/32, B*H)        the state recurrence over the chunks, one block per 32 value
//                                           columns (the rule is independent across value columns): O, the
//                                           final state, and for the backward pass the entering states and U
//   fw_bwd_state   grid (Dv/32, B*H)        the reverse recurrence of the state gradient:
//                                           dU = P^T dO + K dS',  dS = Q^T dO + dS' - W'^T dU
//   fw_bwd_chunk   grid (chunks, B*H)       everything else, chunk by chunk, with dS' (the gradient of the
//                                           state leaving the chunk) and S known:
//     dP = lower_incl(dO U^T),  dQ = dO S^T + dP K,  dK = dP^T Q + U dS'^T,
//     dW' = -dU S^T,  dT = dW' (beta K)^T + dU (beta V)^T,  dA = -strictly_lower(T^T dT T^T),
//     dK += beta (T^T dW') + beta (dA K) + dA^T (beta K),  dV = beta (T^T dU),
//     dbeta = rowsum((T^T dW') K) + rowsum((T^T dU) V) + rowsum((dA K) K)
//   (dO is the output gradient times scale).  The backward pass recomputes fw_prep and fw_recurrent (no
//   intermediate is kept between forward and backward); nothing is accumulated with atomics, so results are
//   deterministic.
//
// The tail of the sequence is padded to a whole chunk with q = k = v = 0, beta = 0 (nothing is written to
// the state, nothing is returned).  No input is modified.
#include "fast_weight.h"

#include "../common/tile.h"

namespace mt {
namespace {

constexpr int LD = kTileLd;

template <int C>
constexpr int CL() {
  return C + 1;
}

// ------------------------------------------------------------------------------------------------------
template <int C, typename T, bool DELTA>
MT_GLOBAL void fw_prep(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const float* __restrict__ beta, int Tn, int Dk, int Dv, float* __restrict__ P,
                       float* __restrict__ W, float* __restrict__ U, float* __restrict__ Tm) {
  MT_DYNAMIC_SMEM(sm);
  constexpr int cl = CL<C>();
  float* Kt = sm;
  float* Qt = Kt + C * LD;
  float* Ab = Qt + C * LD;
  float* Tb = Ab + C * cl;
  float* bs = Tb + C * cl;
  const int tid = static_cast<int>(threadIdx.x);
  const int c = static_cast<int>(blockIdx.x), bh = static_cast<int>(blockIdx.y);
  const int n = ceil_div(Tn, C), Tp = n * C, t0 = c * C, rows = imin(C, Tn - t0);
  const int64_t ik = (static_cast<int64_t>(bh) * Tn + t0) * Dk;
  const int64_t iv = (static_cast<int64_t>(bh) * Tn + t0) * Dv;
  const int64_t ic = (static_cast<int64_t>(bh) * n + c) * C * C;
  if (tid < C) bs[tid] = (DELTA && tid < rows) ? beta[static_cast<int64_t>(bh) * Tn + t0 + tid] : 0.f;

  Frag<C, C> fp, fa;
  fp.zero();
  fa.zero();
  for (int d0 = 0; d0 < Dk; d0 += kTile) {
    const int dc = imin(kTile, Dk - d0);
    load_tile(Kt, LD, k + ik + d0, Dk, C, kTile, rows, dc);
    load_tile(Qt, LD, q + ik + d0, Dk, C, kTile, rows, dc);
    __syncthreads();
    fp.mma(rowmajor(Qt, LD), rowmajor(Kt, LD).t(), kTile);
    if (DELTA) fa.mma(rowmajor(Kt, LD), rowmajor(Kt, LD).t(), kTile);
    __syncthreads();
  }
  for (int a = 0; a < Frag<C, C>::RA; ++a)
    for (int b = 0; b < Frag<C, C>::RB; ++b) {
      const int i = Frag<C, C>::row(a), j = Frag<C, C>::col(b);
      P[ic + i * C + j] = j <= i ? fp.x[a][b] : 0.f;
    }
  if constexpr (DELTA) {
    for (int a = 0; a < Frag<C, C>::RA; ++a)
      for (int b = 0; b < Frag<C, C>::RB; ++b) {
        const int i = Frag<C, C>::row(a), j = Frag<C, C>::col(b);
        Ab[i * cl + j] = j < i ? bs[i] * fa.x[a][b] : 0.f;
      }
    __syncthreads();
    // T = (I + A)^{-1}, unit lower triangular: row i = e_i - sum_{m < i} A[i, m] T[m, :]
    for (int i = 0; i < C; ++i) {
      if (tid < C) {
        const int j = tid;
        float s = 0.f;
        if (j <= i) {
          s = j == i ? 1.f : 0.f;
          for (int m = j; m < i; ++m) s -= Ab[i * cl + m] * Tb[m * cl + j];
        }
        Tb[i * cl + j] = s;
      }
      __syncthreads();
    }
    if (Tm) {
      for (int e = tid; e < C * C; e += kThreads) Tm[ic + e] = Tb[(e / C) * cl + e % C];
    }
    const int64_t wk = (static_cast<int64_t>(bh) * Tp + t0) * Dk;
    const int64_t wv = (static_cast<int64_t>(bh) * Tp + t0) * Dv;
    for (int d0 = 0; d0 < Dk; d0 += kTile) {  // W' = T (beta K)
      const int dc = imin(kTile, Dk - d0);
      load_tile(Kt, LD, k + ik + d0, Dk, C, kTile, rows, dc, 1.f, bs);
      __syncthreads();
      Frag<C, kTile> f;
      f.zero();
      f.mma(rowmajor(Tb, cl), rowmajor(Kt, LD), C);
      store_frag(f, W + wk + d0, Dk, C, dc);
      __syncthreads();
    }
    for (int d0 = 0; d0 < Dv; d0 += kTile) {  // U' = T (beta V)
      const int dc = imin(kTile, Dv - d0);
      load_tile(Kt, LD, v + iv + d0, Dv, C, kTile, rows, dc, 1.f, bs);
      __syncthreads();
      Frag<C, kTile> f;
      f.zero();
      f.mma(rowmajor(Tb, cl), rowmajor(Kt, LD), C);
      store_frag(f, U + wv + d0, Dv, C, dc);
      __syncthreads();
    }
  }  // DELTA
}

// Fill a [DkP, 32] shared-memory state slice from global [Dk, Dv] (columns v0 .. v0 + vc), zeros elsewhere.
MT_DEV void load_state(float* S, const float* src, int DkP, int Dk, int Dv, int v0, int vc) {
  for (int e = static_cast<int>(threadIdx.x); e < DkP * kTile; e += kThreads) {
    const int r = e / kTile, cc = e % kTile;
    S[r * LD + cc] = (src && r < Dk && cc < vc) ? src[static_cast<int64_t>(r) * Dv + v0 + cc] : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------------
template <int C, typename T, bool DELTA>
MT_GLOBAL void fw_recurrent(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const float* __restrict__ W, const float* __restrict__ U, const float* __restrict__ P,
                            const float* __restrict__ s0, T* __restrict__ o, float* __restrict__ final_state,
                            float* __restrict__ Hs, float* __restrict__ Vn, int Tn, int Dk, int Dv, float scale) {
  MT_DYNAMIC_SMEM(sm);
  constexpr int cl = CL<C>();
  const int vb = static_cast<int>(blockIdx.x), bh = static_cast<int>(blockIdx.y);
  const int v0 = vb * kTile, vc = imin(kTile, Dv - v0);
  const int n = ceil_div(Tn, C), Tp = n * C, DkP = ceil_div(Dk, kTile) * kTile;
  float* S = sm;
  float* Ub = S + DkP * LD;
  float* Pb = Ub + C * LD;
  float* Xt = Pb + C * cl;
  const int64_t sbase = static_cast<int64_t>(bh) * Dk * Dv;
  load_state(S, s0 ? s0 + sbase : nullptr, DkP, Dk, Dv, v0, vc);
  __syncthreads();
  for (int c = 0; c < n; ++c) {
    const int t0 = c * C, rows = imin(C, Tn - t0);
    const int64_t ik = (static_cast<int64_t>(bh) * Tn + t0) * Dk;
    const int64_t iv = (static_cast<int64_t>(bh) * Tn + t0) * Dv;
    const int64_t wk = (static_cast<int64_t>(bh) * Tp + t0) * Dk;
    const int64_t wv = (static_cast<int64_t>(bh) * Tp + t0) * Dv;
    if (Hs) store_smem(S, LD, Hs + (static_cast<int64_t>(bh) * n + c) * Dk * Dv + v0, Dv, DkP, kTile, Dk, vc);
    if (DELTA)
      load_tile(Ub, LD, U + wv + v0, Dv, C, kTile, C, vc);
    else
      load_tile(Ub, LD, v + iv + v0, Dv, C, kTile, rows, vc);
    load_tile(Pb, cl, P + (static_cast<int64_t>(bh) * n + c) * C * C, C, C, C, C, C);
    __syncthreads();
    if (DELTA) {  // U = U' - W' S
      Frag<C, kTile> fu;
      fu.zero();
      for (int d0 = 0; d0 < Dk; d0 += kTile) {
        load_tile(Xt, LD, W + wk + d0, Dk, C, kTile, C, imin(kTile, Dk - d0));
        __syncthreads();
        fu.mma(rowmajor(Xt, LD), rowmajor(S + d0 * LD, LD), kTile);
        __syncthreads();
      }
      for (int a = 0; a < Frag<C, kTile>::RA; ++a)
        for (int b = 0; b < Frag<C, kTile>::RB; ++b)
          Ub[Frag<C, kTile>::row(a) * LD + Frag<C, kTile>::col(b)] -= fu.x[a][b];
      __syncthreads();
      if (Vn) store_smem(Ub, LD, Vn + wv + v0, Dv, C, kTile, C, vc);
    }
    if (o) {  // O = scale (P U + Q S)  (not needed when the backward pass recomputes the states)
      Frag<C, kTile> fo;
      fo.zero();
      fo.mma(rowmajor(Pb, cl), rowmajor(Ub, LD), C);
      for (int d0 = 0; d0 < Dk; d0 += kTile) {
        load_tile(Xt, LD, q + ik + d0, Dk, C, kTile, rows, imin(kTile, Dk - d0));
        __syncthreads();
        fo.mma(rowmajor(Xt, LD), rowmajor(S + d0 * LD, LD), kTile);
        __syncthreads();
      }
      store_frag(fo, o + iv + v0, Dv, rows, vc, scale);
    }
    // S <- S + K^T U
    for (int d0 = 0; d0 < Dk; d0 += kTile) {
      load_tile(Xt, LD, k + ik + d0, Dk, C, kTile, rows, imin(kTile, Dk - d0));
      __syncthreads();
      Frag<kTile, kTile> fs;
      fs.zero();
      fs.mma(rowmajor(Xt, LD).t(), rowmajor(Ub, LD), C);
      fs.add_to(rowmajor(S + d0 * LD, LD));
      __syncthreads();
    }
  }
  if (final_state) store_smem(S, LD, final_state + sbase + v0, Dv, DkP, kTile, Dk, vc);
}

// ------------------------------------------------------------------------------------------------------
template <int C, typename T, bool DELTA>
MT_GLOBAL void fw_bwd_state(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ W,
                            const float* __restrict__ P, const T* __restrict__ d_o,
                            const float* __restrict__ d_final, float* __restrict__ dU, float* __restrict__ dHs,
                            float* __restrict__ ds0, int Tn, int Dk, int Dv, float scale) {
  MT_DYNAMIC_SMEM(sm);
  constexpr int cl = CL<C>();
  const int vb = static_cast<int>(blockIdx.x), bh = static_cast<int>(blockIdx.y);
  const int v0 = vb * kTile, vc = imin(kTile, Dv - v0);
  const int n = ceil_div(Tn, C), Tp = n * C, DkP = ceil_div(Dk, kTile) * kTile;
  float* dS = sm;
  float* dUb = dS + DkP * LD;
  float* dOb = dUb + C * LD;
  float* Xt = dOb + C * LD;
  float* Yt = Xt + C * LD;
  float* Pb = Yt + C * LD;
  const int64_t sbase = static_cast<int64_t>(bh) * Dk * Dv;
  load_state(dS, d_final ? d_final + sbase : nullptr, DkP, Dk, Dv, v0, vc);
  __syncthreads();
  for (int c = n - 1; c >= 0; --c) {
    const int t0 = c * C, rows = imin(C, Tn - t0);
    const int64_t ik = (static_cast<int64_t>(bh) * Tn + t0) * Dk;
    const int64_t iv = (static_cast<int64_t>(bh) * Tn + t0) * Dv;
    const int64_t wk = (static_cast<int64_t>(bh) * Tp + t0) * Dk;
    const int64_t wv = (static_cast<int64_t>(bh) * Tp + t0) * Dv;
    // gradient of the state leaving chunk c
    store_smem(dS, LD, dHs + (static_cast<int64_t>(bh) * n + c) * Dk * Dv + v0, Dv, DkP, kTile, Dk, vc);
    load_tile(dOb, LD, d_o + iv + v0, Dv, C, kTile, rows, vc, scale);
    load_tile(Pb, cl, P + (static_cast<int64_t>(bh) * n + c) * C * C, C, C, C, C, C);
    __syncthreads();
    // dU = P^T dO + K dS'
    Frag<C, kTile> fu;
    fu.zero();
    fu.mma(rowmajor(Pb, cl).t(), rowmajor(dOb, LD), C);
    for (int d0 = 0; d0 < Dk; d0 += kTile) {
      load_tile(Xt, LD, k + ik + d0, Dk, C, kTile, rows, imin(kTile, Dk - d0));
      __syncthreads();
      fu.mma(rowmajor(Xt, LD), rowmajor(dS + d0 * LD, LD), kTile);
      __syncthreads();
    }
    fu.store(rowmajor(dUb, LD));
    store_frag(fu, dU + wv + v0, Dv, C, vc);
    __syncthreads();
    // dS = dS' + Q^T dO - W'^T dU
    for (int d0 = 0; d0 < Dk; d0 += kTile) {
      const int dc = imin(kTile, Dk - d0);
      load_tile(Xt, LD, q + ik + d0, Dk, C, kTile, rows, dc);
      if (DELTA) load_tile(Yt, LD, W + wk + d0, Dk, C, kTile, C, dc);
      __syncthreads();
      Frag<kTile, kTile> f;
      f.zero();
      f.mma(rowmajor(Xt, LD).t(), rowmajor(dOb, LD), C);
      if (DELTA) {
        Frag<kTile, kTile> g;
        g.zero();
        g.mma(rowmajor(Yt, LD).t(), rowmajor(dUb, LD), C);
        g.scale(-1.f);
        g.add_to(rowmajor(dS + d0 * LD, LD));
      }
      f.add_to(rowmajor(dS + d0 * LD, LD));
      __syncthreads();
    }
  }
  if (ds0) store_smem(dS, LD, ds0 + sbase + v0, Dv, DkP, kTile, Dk, vc);
}

// ------------------------------------------------------------------------------------------------------
template <int C, typename T, bool DELTA>
MT_GLOBAL void fw_bwd_chunk(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const T* __restrict__ d_o, const float* __restrict__ beta,
                            const float* __restrict__ Tm, const float* __restrict__ Hs,
                            const float* __restrict__ dHs, const float* __restrict__ Vn,
                            const float* __restrict__ dU, float* __restrict__ dq, float* __restrict__ dk,
                            float* __restrict__ dv, float* __restrict__ dbeta, int Tn, int Dk, int Dv,
                            float scale) {
  MT_DYNAMIC_SMEM(sm);
  constexpr int cl = CL<C>();
  using FC = Frag<C, kTile>;
  float* Tb = sm;
  float* dPb = Tb + C * cl;
  float* Xb = dPb + C * cl;
  float* X1 = Xb + C * cl;
  float* X2 = X1 + C * LD;
  float* X3 = X2 + C * LD;
  float* Z = X3 + C * LD;
  float* Xk = Z + C * LD;
  float* Xq = Xk + C * LD;
  float* Y1 = Xq + C * LD;
  float* Y2 = Y1 + kTile * LD;
  float* bs = Y2 + kTile * LD;
  float* dbs = bs + C;
  const int tid = static_cast<int>(threadIdx.x);
  const int c = static_cast<int>(blockIdx.x), bh = static_cast<int>(blockIdx.y);
  const int n = ceil_div(Tn, C), Tp = n * C, t0 = c * C, rows = imin(C, Tn - t0);
  const int64_t ik = (static_cast<int64_t>(bh) * Tn + t0) * Dk;
  const int64_t iv = (static_cast<int64_t>(bh) * Tn + t0) * Dv;
  const int64_t wv = (static_cast<int64_t>(bh) * Tp + t0) * Dv;
  const int64_t ic = (static_cast<int64_t>(bh) * n + c);
  const float* Sg = Hs + ic * Dk * Dv;
  const float* dSg = dHs + ic * Dk * Dv;
  if (tid < C) {
    bs[tid] = (DELTA && tid < rows) ? beta[static_cast<int64_t>(bh) * Tn + t0 + tid] : 0.f;
    dbs[tid] = 0.f;
  }
  if (DELTA) load_tile(Tb, cl, Tm + ic * C * C, C, C, C, C, C);

  // dP = lower_incl(dO U^T)
  Frag<C, C> fdp;
  fdp.zero();
  for (int v0 = 0; v0 < Dv; v0 += kTile) {
    const int vc = imin(kTile, Dv - v0);
    load_tile(X1, LD, d_o + iv + v0, Dv, C, kTile, rows, vc, scale);
    if (DELTA)
      load_tile(X2, LD, Vn + wv + v0, Dv, C, kTile, C, vc);
    else
      load_tile(X2, LD, v + iv + v0, Dv, C, kTile, rows, vc);
    __syncthreads();
    fdp.mma(rowmajor(X1, LD), rowmajor(X2, LD).t(), kTile);
    __syncthreads();
  }
  for (int a = 0; a < Frag<C, C>::RA; ++a)
    for (int b = 0; b < Frag<C, C>::RB; ++b) {
      const int i = Frag<C, C>::row(a), j = Frag<C, C>::col(b);
      dPb[i * cl + j] = j <= i ? fdp.x[a][b] : 0.f;
    }
  __syncthreads();

  Frag<C, C> fdt;  // dT, accumulated over the value and key columns
  fdt.zero();
  if (DELTA) {
    for (int v0 = 0; v0 < Dv; v0 += kTile) {  // dT += dU (beta V)^T;  dV = beta T^T dU
      const int vc = imin(kTile, Dv - v0);
      load_tile(X1, LD, dU + wv + v0, Dv, C, kTile, C, vc);
      load_tile(X2, LD, v + iv + v0, Dv, C, kTile, rows, vc);
      load_tile(X3, LD, v + iv + v0, Dv, C, kTile, rows, vc, 1.f, bs);
      __syncthreads();
      fdt.mma(rowmajor(X1, LD), rowmajor(X3, LD).t(), kTile);
      FC fb;
      fb.zero();
      fb.mma(rowmajor(Tb, cl).t(), rowmajor(X1, LD), C);
      for (int a = 0; a < FC::RA; ++a)
        for (int b = 0; b < FC::RB; ++b) {
          const int i = FC::row(a), cc = FC::col(b);
          Z[i * LD + cc] = fb.x[a][b] * X2[i * LD + cc];
          if (i < rows && cc < vc) dv[iv + static_cast<int64_t>(i) * Dv + v0 + cc] = bs[i] * fb.x[a][b];
        }
      __syncthreads();
      rowsum_add(Z, LD, C, kTile, dbs);
      __syncthreads();
    }
  }

  for (int d0 = 0; d0 < Dk; d0 += kTile) {
    const int dc = imin(kTile, Dk - d0);
    FC fq, fw, fk;
    fq.zero();
    fw.zero();
    fk.zero();
    for (int v0 = 0; v0 < Dv; v0 += kTile) {
      const int vc = imin(kTile, Dv - v0);
      load_tile(X1, LD, d_o + iv + v0, Dv, C, kTile, rows, vc, scale);
      load_tile(Y1, LD, Sg + static_cast<int64_t>(d0) * Dv + v0, Dv, kTile, kTile, dc, vc);
      load_tile(Y2, LD, dSg + static_cast<int64_t>(d0) * Dv + v0, Dv, kTile, kTile, dc, vc);
      if (DELTA) {
        load_tile(X2, LD, dU + wv + v0, Dv, C, kTile, C, vc);
        load_tile(X3, LD, Vn + wv + v0, Dv, C, kTile, C, vc);
      } else {
        load_tile(X3, LD, v + iv + v0, Dv, C, kTile, rows, vc);
      }
      __syncthreads();
      fq.mma(rowmajor(X1, LD), rowmajor(Y1, LD).t(), kTile);  // dO S^T
      if (DELTA) fw.mma(rowmajor(X2, LD), rowmajor(Y1, LD).t(), kTile);  // dU S^T
      fk.mma(rowmajor(X3, LD), rowmajor(Y2, LD).t(), kTile);  // U dS'^T
      __syncthreads();
    }
    load_tile(Xk, LD, k + ik + d0, Dk, C, kTile, rows, dc);
    load_tile(Xq, LD, q + ik + d0, Dk, C, kTile, rows, dc);
    __syncthreads();
    fq.mma(rowmajor(dPb, cl), rowmajor(Xk, LD), C);  // + dP K
    store_frag(fq, dq + ik + d0, Dk, rows, dc);
    fk.mma(rowmajor(dPb, cl).t(), rowmajor(Xq, LD), C);  // + dP^T Q
    if (DELTA) {
      fw.scale(-1.f);  // dW' = -dU S^T
      fw.store(rowmajor(Z, LD));
      for (int e = tid; e < C * kTile; e += kThreads) {
        const int r = e / kTile, cc = e % kTile;
        X1[r * LD + cc] = bs[r] * Xk[r * LD + cc];
      }
      __syncthreads();
      fdt.mma(rowmajor(Z, LD), rowmajor(X1, LD).t(), kTile);  // dT += dW' (beta K)^T
      FC fb;
      fb.zero();
      fb.mma(rowmajor(Tb, cl).t(), rowmajor(Z, LD), C);  // T^T dW'
      for (int a = 0; a < FC::RA; ++a)
        for (int b = 0; b < FC::RB; ++b) {
          const int i = FC::row(a), cc = FC::col(b);
          fk.x[a][b] += bs[i] * fb.x[a][b];
          X2[i * LD + cc] = fb.x[a][b] * Xk[i * LD + cc];
        }
      __syncthreads();
      rowsum_add(X2, LD, C, kTile, dbs);
    }
    store_frag(fk, dk + ik + d0, Dk, rows, dc);
    __syncthreads();
  }
  if constexpr (DELTA) {
    // dA = -strictly_lower(T^T dT T^T), into dPb
    fdt.store(rowmajor(dPb, cl));
    __syncthreads();
    {
      Frag<C, C> fx;
      fx.zero();
      fx.mma(rowmajor(Tb, cl).t(), rowmajor(dPb, cl), C);
      fx.store(rowmajor(Xb, cl));
    }
    __syncthreads();
    {
      Frag<C, C> fa;
      fa.zero();
      fa.mma(rowmajor(Xb, cl), rowmajor(Tb, cl).t(), C);
      for (int a = 0; a < Frag<C, C>::RA; ++a)
        for (int b = 0; b < Frag<C, C>::RB; ++b) {
          const int i = Frag<C, C>::row(a), j = Frag<C, C>::col(b);
          dPb[i * cl + j] = j < i ? -fa.x[a][b] : 0.f;
        }
    }
    __syncthreads();
    for (int d0 = 0; d0 < Dk; d0 += kTile) {  // dK += beta (dA K) + dA^T (beta K);  dbeta += rowsum((dA K) K)
      const int dc = imin(kTile, Dk - d0);
      load_tile(Xk, LD, k + ik + d0, Dk, C, kTile, rows, dc);
      load_tile(X1, LD, k + ik + d0, Dk, C, kTile, rows, dc, 1.f, bs);
      __syncthreads();
      FC fy, fz;
      fy.zero();
      fz.zero();
      fy.mma(rowmajor(dPb, cl), rowmajor(Xk, LD), C);
      fz.mma(rowmajor(dPb, cl).t(), rowmajor(X1, LD), C);
      for (int a = 0; a < FC::RA; ++a)
        for (int b = 0; b < FC::RB; ++b) {
          const int i = FC::row(a), cc = FC::col(b);
          X2[i * LD + cc] = fy.x[a][b] * Xk[i * LD + cc];
          // the same thread wrote this element of dk in the loop above
          if (i < rows && cc < dc) dk[ik + static_cast<int64_t>(i) * Dk + d0 + cc] += bs[i] * fy.x[a][b] + fz.x[a][b];
        }
      __syncthreads();
      rowsum_add(X2, LD, C, kTile, dbs);
      __syncthreads();
    }
    if (tid < rows) dbeta[static_cast<int64_t>(bh) * Tn + t0 + tid] = dbs[tid];
  }  // DELTA
}

// ------------------------------------------------------------------------------------------------------
// launchers

template <int C>
size_t smem_prep() {
  return sizeof(float) * (2 * C * LD + 2 * C * CL<C>() + C);
}
template <int C>
size_t smem_recurrent(int DkP) {
  return sizeof(float) * (DkP * LD + 2 * C * LD + C * CL<C>());
}
template <int C>
size_t smem_bwd_state(int DkP) {
  return sizeof(float) * (DkP * LD + 4 * C * LD + C * CL<C>());
}
template <int C>
size_t smem_bwd_chunk() {
  return sizeof(float) * (3 * C * CL<C>() + 6 * C * LD + 2 * kTile * LD + 2 * C);
}

#define MT_TRY(expr)                  \
  do {                                \
    std::string err_ = (expr);        \
    if (!err_.empty()) return err_;   \
  } while (0)

template <int C, typename T, bool DELTA>
std::string fw_forward_impl(const FwShape& s, const FwForwardArgs& a, void* stream) {
  const int n = ceil_div(s.T, C), nvb = ceil_div(s.Dv, kTile), DkP = ceil_div(s.Dk, kTile) * kTile;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  auto prep = fw_prep<C, T, DELTA>;
  auto recurrent = fw_recurrent<C, T, DELTA>;
  const size_t sp = smem_prep<C>(), sr = smem_recurrent<C>(DkP);
  MT_TRY(allow_smem(prep, sp));
  MT_TRY(allow_smem(recurrent, sr));
  MT_LAUNCH(prep, dim3(n, s.BH), kThreads, sp, stream, q, k, v, a.beta, s.T, s.Dk, s.Dv, a.ws_p, a.ws_w, a.ws_u,
            static_cast<float*>(nullptr));
  MT_TRY(launch_error());
  MT_LAUNCH(recurrent, dim3(nvb, s.BH), kThreads, sr, stream, q, k, v, a.ws_w, a.ws_u, a.ws_p, a.s0,
            static_cast<T*>(a.o), a.final_state, static_cast<float*>(nullptr), static_cast<float*>(nullptr), s.T,
            s.Dk, s.Dv, s.scale);
  return launch_error();
}

template <int C, typename T, bool DELTA>
std::string fw_backward_impl(const FwShape& s, const FwBackwardArgs& a, void* stream) {
  const int n = ceil_div(s.T, C), nvb = ceil_div(s.Dv, kTile), DkP = ceil_div(s.Dk, kTile) * kTile;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* d_o = static_cast<const T*>(a.d_o);
  auto prep = fw_prep<C, T, DELTA>;
  auto recurrent = fw_recurrent<C, T, DELTA>;
  auto bwd_state = fw_bwd_state<C, T, DELTA>;
  auto bwd_chunk = fw_bwd_chunk<C, T, DELTA>;
  const size_t sp = smem_prep<C>(), sr = smem_recurrent<C>(DkP), ss = smem_bwd_state<C>(DkP),
               sc = smem_bwd_chunk<C>();
  MT_TRY(allow_smem(prep, sp));
  MT_TRY(allow_smem(recurrent, sr));
  MT_TRY(allow_smem(bwd_state, ss));
  MT_TRY(allow_smem(bwd_chunk, sc));
  // recompute the forward intermediates: W', U', P, T, the entering states and U
  MT_LAUNCH(prep, dim3(n, s.BH), kThreads, sp, stream, q, k, v, a.beta, s.T, s.Dk, s.Dv, a.ws_p, a.ws_w, a.ws_u,
            a.ws_t);
  MT_TRY(launch_error());
  MT_LAUNCH(recurrent, dim3(nvb, s.BH), kThreads, sr, stream, q, k, v, a.ws_w, a.ws_u, a.ws_p, a.s0,
            static_cast<T*>(nullptr), static_cast<float*>(nullptr), a.ws_states, a.ws_vnew, s.T, s.Dk, s.Dv,
            s.scale);
  MT_TRY(launch_error());
  MT_LAUNCH(bwd_state, dim3(nvb, s.BH), kThreads, ss, stream, q, k, a.ws_w, a.ws_p, d_o, a.d_final, a.ws_du,
            a.ws_dstates, a.ds0, s.T, s.Dk, s.Dv, s.scale);
  MT_TRY(launch_error());
  MT_LAUNCH(bwd_chunk, dim3(n, s.BH), kThreads, sc, stream, q, k, v, d_o, a.beta, a.ws_t, a.ws_states,
            a.ws_dstates, a.ws_vnew, a.ws_du, a.dq, a.dk, a.dv, a.dbeta, s.T, s.Dk, s.Dv, s.scale);
  return launch_error();
}

}  // namespace

FwWorkspace fw_workspace_sizes(const FwShape& s, bool backward) {
  const int64_t n = ceil_div(s.T, s.chunk), Tp = n * s.chunk, C = s.chunk, BH = s.BH;
  FwWorkspace w{};
  w.p = BH * n * C * C;
  w.w = s.delta ? BH * Tp * s.Dk : 0;
  w.u = s.delta ? BH * Tp * s.Dv : 0;
  if (backward) {
    w.t = s.delta ? BH * n * C * C : 0;
    w.states = BH * n * s.Dk * s.Dv;
    w.vnew = s.delta ? BH * Tp * s.Dv : 0;
    w.dstates = BH * n * s.Dk * s.Dv;
    w.du = BH * Tp * s.Dv;
  }
  return w;
}

#define MT_FW_DISPATCH(IMPL, ARGS)                                                                   \
  do {                                                                                              \
    const bool bf = s.dtype == DType::kBFloat16;                                                    \
    if (s.chunk == 64) {                                                                            \
      if (s.delta) return bf ? IMPL<64, bf16, true>(s, ARGS, stream) : IMPL<64, float, true>(s, ARGS, stream); \
      return bf ? IMPL<64, bf16, false>(s, ARGS, stream) : IMPL<64, float, false>(s, ARGS, stream);           \
    }                                                                                               \
    if (s.chunk == 32) {                                                                            \
      if (s.delta) return bf ? IMPL<32, bf16, true>(s, ARGS, stream) : IMPL<32, float, true>(s, ARGS, stream); \
      return bf ? IMPL<32, bf16, false>(s, ARGS, stream) : IMPL<32, float, false>(s, ARGS, stream);           \
    }                                                                                               \
    return "fast-weight kernel: chunk size " + std::to_string(s.chunk) + " is not one of 32, 64";    \
  } while (0)

std::string fw_forward(const FwShape& s, const FwForwardArgs& a, void* stream) { MT_FW_DISPATCH(fw_forward_impl, a); }

std::string fw_backward(const FwShape& s, const FwBackwardArgs& a, void* stream) {
  MT_FW_DISPATCH(fw_backward_impl, a);
}

}  // namespace mt
