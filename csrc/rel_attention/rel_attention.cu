// Flash-style attention with Transformer-XL relative positions (see rel_attention.h for the definition).
//
// Dai et al., "Transformer-XL" (ACL 2019), Sec. 3.3: the score of query i and key j is
// (q_i + u)^T k_j + (q_i + v)^T W_R R_{i-j}; XL materialises the N x (M + N) position scores and realigns
// them with a pad-and-reshape "rel_shift".  Here the realignment happens inside the kernel: a 32 x 32 tile
// of scores reads the 63 position rows r_{r_offset + j - i} it needs (a band) into shared memory, so no
// score matrix is ever written to global memory.  The softmax is the online (running max / running sum)
// form of FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023, Alg. 1 and 2).
//
// Kernels (256 threads per block, 32 x 32 tiles, fp32 arithmetic on shared-memory tiles, no tensor cores):
//   ra_fwd     grid (R/32, B, H)   O and the log-sum-exp, one block per 32 queries, looping over key tiles
//   ra_bwd_kv  grid (Ck/32, B, H)  dK and dV, one block per 32 keys, looping over query tiles
//   ra_bwd_q   grid (R/32, B, H)   dQu, dQv and dR, one block per 32 queries; dR (shared by every batch row
//                                  and query) is accumulated with fp32 atomics, so its last bits depend on
//                                  the order the blocks finish in
// with the backward of the softmax as in FlashAttention: dS_ij = P_ij (dP_ij - dl_i),
// dP_ij = dO_i . v_j, dl_i = dO_i . O_i - dlse_i (computed by the caller).
#include "rel_attention.h"

#include "../common/tile.h"

namespace mt {
namespace {

constexpr int BQ = 32, BK = 32, NB = BQ + BK - 1, SL = BK + 1;

struct Visibility {
  int q_start, window, key_start, R, Ck;
  Order order;
  const int* q_doc;  // this batch row's document ids, or nullptr
  const int* k_doc;

  MT_DEV bool operator()(int i, int j) const {
    if (i >= R || j >= Ck || j < key_start) return false;
    const int qp = q_start + i;
    if (order == Order::kPast && j > qp) return false;
    if (order == Order::kFuture && j <= qp) return false;
    if (window > 0 && qp - j >= window) return false;
    if (q_doc && q_doc[i] != k_doc[j]) return false;
    return true;
  }
};

MT_DEV Visibility make_visibility(const RelAttnShape& s, const RelAttnMaskArgs& m, int b) {
  Visibility v;
  v.q_start = s.q_start;
  v.window = s.window;
  v.key_start = m.key_start ? m.key_start[b] : 0;
  v.R = s.R;
  v.Ck = s.Ck;
  v.order = s.order;
  v.q_doc = m.q_doc ? m.q_doc + static_cast<int64_t>(b) * s.R : nullptr;
  v.k_doc = m.k_doc ? m.k_doc + static_cast<int64_t>(b) * s.Ck : nullptr;
  return v;
}

// Keys [jlo, jhi) that queries i0 .. i1-1 may see (order, window and key_start; documents are per pair).
MT_DEV void key_range(const Visibility& vis, int i0, int i1, int& jlo, int& jhi) {
  jlo = imax(0, vis.key_start);
  jhi = vis.Ck;
  const int qp0 = vis.q_start + i0, qp1 = vis.q_start + i1 - 1;
  if (vis.order == Order::kPast) jhi = imin(jhi, qp1 + 1);
  if (vis.order == Order::kFuture) jlo = imax(jlo, qp0 + 1);
  if (vis.window > 0) jlo = imax(jlo, qp0 - vis.window + 1);
}

// Queries [ilo, ihi) that may see keys j0 .. j1-1.
MT_DEV void query_range(const Visibility& vis, int j0, int j1, int& ilo, int& ihi) {
  ilo = 0;
  ihi = vis.R;
  if (j1 - 1 < vis.key_start) {
    ihi = 0;
    return;
  }
  if (vis.order == Order::kPast) ilo = imax(ilo, j0 - vis.q_start);
  if (vis.order == Order::kFuture) ihi = imin(ihi, j1 - 1 - vis.q_start);
  if (vis.window > 0) ihi = imin(ihi, vis.window + j1 - 1 - vis.q_start);
}

// The band of position rows r_{rb0 + t}, t < NB, as fp32 (zeros outside [0, P) and beyond D).
template <typename T, int DMAX>
MT_DEV void load_band(float* Rb, const T* r_head, int rb0, int P, int D) {
  constexpr int DL = DMAX + 1;
  for (int e = static_cast<int>(threadIdx.x); e < NB * DMAX; e += kThreads) {
    const int t = e / DMAX, d = e % DMAX, row = rb0 + t;
    Rb[t * DL + d] = (row >= 0 && row < P && d < D) ? to_float(r_head[static_cast<int64_t>(row) * D + d]) : 0.f;
  }
}

// Scores of a 32 x 32 tile: s_ij = Qu_i . K_j + Qv_i . Rb_{j - i + BQ - 1}.
template <int DMAX>
MT_DEV void tile_scores(Frag<BQ, BK>& fs, const float* Qu, const float* Qv, const float* Kb, const float* Rb,
                        int D) {
  constexpr int DL = DMAX + 1;
  using F = Frag<BQ, BK>;
  fs.zero();
  for (int d = 0; d < D; ++d) {
    float qa[F::RA], qb[F::RA], kk[F::RB];
    for (int a = 0; a < F::RA; ++a) {
      qa[a] = Qu[F::row(a) * DL + d];
      qb[a] = Qv[F::row(a) * DL + d];
    }
    for (int b = 0; b < F::RB; ++b) kk[b] = Kb[F::col(b) * DL + d];
    for (int a = 0; a < F::RA; ++a)
      for (int b = 0; b < F::RB; ++b)
        fs.x[a][b] += qa[a] * kk[b] + qb[a] * Rb[(F::col(b) - F::row(a) + BQ - 1) * DL + d];
  }
}

// ------------------------------------------------------------------------------------------------------
template <typename T, int DMAX>
MT_GLOBAL void ra_fwd(RelAttnShape s, RelAttnForwardArgs args) {
  MT_DYNAMIC_SMEM(sm);
  constexpr int DL = DMAX + 1;
  using F = Frag<BQ, BK>;
  float* Qu = sm;
  float* Qv = Qu + BQ * DL;
  float* Kb = Qv + BQ * DL;
  float* Vb = Kb + BK * DL;
  float* Rb = Vb + BK * DL;
  float* Sb = Rb + NB * DL;
  float* mrow = Sb + BQ * SL;
  float* lrow = mrow + BQ;
  float* arow = lrow + BQ;
  const int tid = static_cast<int>(threadIdx.x);
  const int i0 = static_cast<int>(blockIdx.x) * BQ, b = static_cast<int>(blockIdx.y), h = static_cast<int>(blockIdx.z);
  const int rq = imin(BQ, s.R - i0), D = s.D;
  const int64_t hb = static_cast<int64_t>(h) * s.B + b;
  const int64_t qbase = (hb * s.R + i0) * D, kbase = hb * s.Ck * D;
  const T* r_head = static_cast<const T*>(args.r) + static_cast<int64_t>(h) * s.P * D;
  const Visibility vis = make_visibility(s, args.mask, b);

  load_tile(Qu, DL, static_cast<const T*>(args.qu) + qbase, D, BQ, DMAX, rq, D);
  load_tile(Qv, DL, static_cast<const T*>(args.qv) + qbase, D, BQ, DMAX, rq, D);
  if (tid < BQ) {
    mrow[tid] = -INFINITY;
    lrow[tid] = 0.f;
  }
  int jlo, jhi;
  key_range(vis, i0, i0 + rq, jlo, jhi);
  Frag<BQ, DMAX> fo;
  fo.zero();
  __syncthreads();
  for (int j0 = (jlo / BK) * BK; j0 < jhi; j0 += BK) {
    const int ck = imin(BK, s.Ck - j0);
    load_tile(Kb, DL, static_cast<const T*>(args.k) + kbase + static_cast<int64_t>(j0) * D, D, BK, DMAX, ck, D);
    load_tile(Vb, DL, static_cast<const T*>(args.v) + kbase + static_cast<int64_t>(j0) * D, D, BK, DMAX, ck, D);
    load_band<T, DMAX>(Rb, r_head, s.r_offset + j0 - i0 - (BQ - 1), s.P, D);
    __syncthreads();
    F fs;
    tile_scores<DMAX>(fs, Qu, Qv, Kb, Rb, D);
    for (int a = 0; a < F::RA; ++a)
      for (int bb = 0; bb < F::RB; ++bb) {
        const int i = F::row(a), j = F::col(bb);
        Sb[i * SL + j] = vis(i0 + i, j0 + j) ? fs.x[a][bb] : -INFINITY;
      }
    __syncthreads();
    if (tid < BQ) {  // online softmax, one thread per query row
      float* srow = Sb + tid * SL;
      float mx = -INFINITY;
      for (int j = 0; j < BK; ++j) mx = fmaxf(mx, srow[j]);
      const float m_old = mrow[tid], m_new = fmaxf(m_old, mx);
      float alpha = 1.f, sum = 0.f;
      if (m_new == -INFINITY) {
        for (int j = 0; j < BK; ++j) srow[j] = 0.f;
      } else {
        alpha = expf(m_old - m_new);
        for (int j = 0; j < BK; ++j) {
          const float p = expf(srow[j] - m_new);
          srow[j] = p;
          sum += p;
        }
      }
      lrow[tid] = lrow[tid] * alpha + sum;
      mrow[tid] = m_new;
      arow[tid] = alpha;
    }
    __syncthreads();
    for (int a = 0; a < Frag<BQ, DMAX>::RA; ++a) {
      const float al = arow[Frag<BQ, DMAX>::row(a)];
      for (int bb = 0; bb < Frag<BQ, DMAX>::RB; ++bb) fo.x[a][bb] *= al;
    }
    fo.mma(rowmajor(Sb, SL), rowmajor(Vb, DL), BK);
    __syncthreads();
  }
  for (int a = 0; a < Frag<BQ, DMAX>::RA; ++a) {
    const float l = lrow[Frag<BQ, DMAX>::row(a)];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int bb = 0; bb < Frag<BQ, DMAX>::RB; ++bb) fo.x[a][bb] *= inv;
  }
  store_frag(fo, static_cast<T*>(args.o) + qbase, D, rq, D);
  if (tid < rq) args.lse[hb * s.R + i0 + tid] = lrow[tid] > 0.f ? mrow[tid] + logf(lrow[tid]) : -INFINITY;
}

// P_ij and dS_ij of a tile (into Pb, dSb), from the scores, dP = dO V^T, lse and dl of the rows.
template <int DMAX>
MT_DEV void tile_probs(const Visibility& vis, int i0, int j0, const float* Qu, const float* Qv, const float* Kb,
                       const float* Vb, const float* Rb, const float* dOb, const float* lse_s, const float* dl_s,
                       int D, float* Pb, float* dSb) {
  constexpr int DL = DMAX + 1;
  using F = Frag<BQ, BK>;
  F fs, fdp;
  tile_scores<DMAX>(fs, Qu, Qv, Kb, Rb, D);
  fdp.zero();
  fdp.mma(rowmajor(const_cast<float*>(dOb), DL), rowmajor(const_cast<float*>(Vb), DL).t(), D);
  for (int a = 0; a < F::RA; ++a)
    for (int bb = 0; bb < F::RB; ++bb) {
      const int i = F::row(a), j = F::col(bb);
      const float p = vis(i0 + i, j0 + j) ? expf(fs.x[a][bb] - lse_s[i]) : 0.f;
      if (Pb) Pb[i * SL + j] = p;
      dSb[i * SL + j] = p * (fdp.x[a][bb] - dl_s[i]);
    }
}

template <typename T, int DMAX>
MT_DEV void load_query_side(const RelAttnShape& s, const RelAttnBackwardArgs& args, int64_t hb, int i0, int rq,
                            float* Qu, float* Qv, float* dOb, float* lse_s, float* dl_s) {
  constexpr int DL = DMAX + 1;
  const int D = s.D;
  const int64_t qbase = (hb * s.R + i0) * D;
  load_tile(Qu, DL, static_cast<const T*>(args.qu) + qbase, D, BQ, DMAX, rq, D);
  load_tile(Qv, DL, static_cast<const T*>(args.qv) + qbase, D, BQ, DMAX, rq, D);
  load_tile(dOb, DL, static_cast<const T*>(args.d_o) + qbase, D, BQ, DMAX, rq, D);
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < BQ) {
    lse_s[tid] = tid < rq ? args.lse[hb * s.R + i0 + tid] : 0.f;
    dl_s[tid] = tid < rq ? args.dl[hb * s.R + i0 + tid] : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------------
template <typename T, int DMAX>
MT_GLOBAL void ra_bwd_kv(RelAttnShape s, RelAttnBackwardArgs args) {
  MT_DYNAMIC_SMEM(sm);
  constexpr int DL = DMAX + 1;
  float* Kb = sm;
  float* Vb = Kb + BK * DL;
  float* Qu = Vb + BK * DL;
  float* Qv = Qu + BQ * DL;
  float* dOb = Qv + BQ * DL;
  float* Rb = dOb + BQ * DL;
  float* Pb = Rb + NB * DL;
  float* dSb = Pb + BQ * SL;
  float* lse_s = dSb + BQ * SL;
  float* dl_s = lse_s + BQ;
  const int j0 = static_cast<int>(blockIdx.x) * BK, b = static_cast<int>(blockIdx.y), h = static_cast<int>(blockIdx.z);
  const int ck = imin(BK, s.Ck - j0), D = s.D;
  const int64_t hb = static_cast<int64_t>(h) * s.B + b;
  const int64_t kbase = (hb * s.Ck + j0) * D;
  const T* r_head = static_cast<const T*>(args.r) + static_cast<int64_t>(h) * s.P * D;
  const Visibility vis = make_visibility(s, args.mask, b);
  load_tile(Kb, DL, static_cast<const T*>(args.k) + kbase, D, BK, DMAX, ck, D);
  load_tile(Vb, DL, static_cast<const T*>(args.v) + kbase, D, BK, DMAX, ck, D);
  int ilo, ihi;
  query_range(vis, j0, j0 + ck, ilo, ihi);
  Frag<BK, DMAX> fdk, fdv;
  fdk.zero();
  fdv.zero();
  for (int i0 = (imax(ilo, 0) / BQ) * BQ; i0 < ihi; i0 += BQ) {
    const int rq = imin(BQ, s.R - i0);
    load_query_side<T, DMAX>(s, args, hb, i0, rq, Qu, Qv, dOb, lse_s, dl_s);
    load_band<T, DMAX>(Rb, r_head, s.r_offset + j0 - i0 - (BQ - 1), s.P, D);
    __syncthreads();
    tile_probs<DMAX>(vis, i0, j0, Qu, Qv, Kb, Vb, Rb, dOb, lse_s, dl_s, D, Pb, dSb);
    __syncthreads();
    fdv.mma(rowmajor(Pb, SL).t(), rowmajor(dOb, DL), BQ);   // dV += P^T dO
    fdk.mma(rowmajor(dSb, SL).t(), rowmajor(Qu, DL), BQ);  // dK += dS^T Qu
    __syncthreads();
  }
  store_frag(fdk, args.dk + kbase, D, ck, D);
  store_frag(fdv, args.dv + kbase, D, ck, D);
}

// ------------------------------------------------------------------------------------------------------
template <typename T, int DMAX>
MT_GLOBAL void ra_bwd_q(RelAttnShape s, RelAttnBackwardArgs args) {
  MT_DYNAMIC_SMEM(sm);
  constexpr int DL = DMAX + 1;
  using FO = Frag<BQ, DMAX>;
  float* Qu = sm;
  float* Qv = Qu + BQ * DL;
  float* dOb = Qv + BQ * DL;
  float* Kb = dOb + BQ * DL;
  float* Vb = Kb + BK * DL;
  float* Rb = Vb + BK * DL;
  float* dSb = Rb + NB * DL;
  float* lse_s = dSb + BQ * SL;
  float* dl_s = lse_s + BQ;
  const int i0 = static_cast<int>(blockIdx.x) * BQ, b = static_cast<int>(blockIdx.y), h = static_cast<int>(blockIdx.z);
  const int rq = imin(BQ, s.R - i0), D = s.D;
  const int64_t hb = static_cast<int64_t>(h) * s.B + b;
  const int64_t qbase = (hb * s.R + i0) * D, kbase = hb * s.Ck * D;
  const T* r_head = static_cast<const T*>(args.r) + static_cast<int64_t>(h) * s.P * D;
  float* dr_head = args.dr + static_cast<int64_t>(h) * s.P * D;
  const Visibility vis = make_visibility(s, args.mask, b);
  load_query_side<T, DMAX>(s, args, hb, i0, rq, Qu, Qv, dOb, lse_s, dl_s);
  int jlo, jhi;
  key_range(vis, i0, i0 + rq, jlo, jhi);
  FO fdqu, fdqv;
  fdqu.zero();
  fdqv.zero();
  __syncthreads();
  for (int j0 = (jlo / BK) * BK; j0 < jhi; j0 += BK) {
    const int ck = imin(BK, s.Ck - j0), rb0 = s.r_offset + j0 - i0 - (BQ - 1);
    load_tile(Kb, DL, static_cast<const T*>(args.k) + kbase + static_cast<int64_t>(j0) * D, D, BK, DMAX, ck, D);
    load_tile(Vb, DL, static_cast<const T*>(args.v) + kbase + static_cast<int64_t>(j0) * D, D, BK, DMAX, ck, D);
    load_band<T, DMAX>(Rb, r_head, rb0, s.P, D);
    __syncthreads();
    tile_probs<DMAX>(vis, i0, j0, Qu, Qv, Kb, Vb, Rb, dOb, lse_s, dl_s, D, nullptr, dSb);
    __syncthreads();
    fdqu.mma(rowmajor(dSb, SL), rowmajor(Kb, DL), BK);  // dQu += dS K
    for (int jj = 0; jj < BK; ++jj) {                    // dQv_i += sum_j dS_ij r_{j - i}
      float ds[FO::RA];
      for (int a = 0; a < FO::RA; ++a) ds[a] = dSb[FO::row(a) * SL + jj];
      for (int a = 0; a < FO::RA; ++a) {
        const float* rrow = Rb + (jj - FO::row(a) + BQ - 1) * DL;
        for (int bb = 0; bb < FO::RB; ++bb) fdqv.x[a][bb] += ds[a] * rrow[FO::col(bb)];
      }
    }
    // dR_{rb0 + t} += sum_i dS_{i, t - (BQ-1) + i} Qv_i   (t: position row in the band)
    for (int e = static_cast<int>(threadIdx.x); e < NB * D; e += kThreads) {
      const int t = e / D, d = e % D, row = rb0 + t;
      if (row < 0 || row >= s.P) continue;
      const int lo = imax(0, BQ - 1 - t), hi = imin(BQ, BQ - 1 - t + BK);
      float acc = 0.f;
      for (int ii = lo; ii < hi; ++ii) acc += dSb[ii * SL + t - (BQ - 1) + ii] * Qv[ii * DL + d];
      if (acc != 0.f) atomicAdd(dr_head + static_cast<int64_t>(row) * D + d, acc);
    }
    __syncthreads();
  }
  store_frag(fdqu, args.dqu + qbase, D, rq, D);
  store_frag(fdqv, args.dqv + qbase, D, rq, D);
}

// ------------------------------------------------------------------------------------------------------
template <int DMAX>
size_t smem_fwd() {
  return sizeof(float) * ((2 * BQ + 2 * BK + NB) * (DMAX + 1) + BQ * SL + 3 * BQ);
}
template <int DMAX>
size_t smem_bwd_kv() {
  return sizeof(float) * ((3 * BQ + 2 * BK + NB) * (DMAX + 1) + 2 * BQ * SL + 2 * BQ);
}
template <int DMAX>
size_t smem_bwd_q() {
  return sizeof(float) * ((3 * BQ + 2 * BK + NB) * (DMAX + 1) + BQ * SL + 2 * BQ);
}

template <typename T, int DMAX>
std::string ra_forward_impl(const RelAttnShape& s, const RelAttnForwardArgs& a, void* stream) {
  auto kern = ra_fwd<T, DMAX>;
  const size_t sm = smem_fwd<DMAX>();
  std::string err = allow_smem(kern, sm);
  if (!err.empty()) return err;
  MT_LAUNCH(kern, dim3(ceil_div(s.R, BQ), s.B, s.H), kThreads, sm, stream, s, a);
  return launch_error();
}

template <typename T, int DMAX>
std::string ra_backward_impl(const RelAttnShape& s, const RelAttnBackwardArgs& a, void* stream) {
  auto kv = ra_bwd_kv<T, DMAX>;
  auto qk = ra_bwd_q<T, DMAX>;
  const size_t s1 = smem_bwd_kv<DMAX>(), s2 = smem_bwd_q<DMAX>();
  std::string err = allow_smem(kv, s1);
  if (err.empty()) err = allow_smem(qk, s2);
  if (!err.empty()) return err;
  MT_LAUNCH(kv, dim3(ceil_div(s.Ck, BK), s.B, s.H), kThreads, s1, stream, s, a);
  err = launch_error();
  if (!err.empty()) return err;
  MT_LAUNCH(qk, dim3(ceil_div(s.R, BQ), s.B, s.H), kThreads, s2, stream, s, a);
  return launch_error();
}

}  // namespace

#define MT_RA_DISPATCH(IMPL, ARGS)                                                                        \
  do {                                                                                                   \
    if (s.D < 1 || s.D > kRelAttnMaxHead)                                                                \
      return "relative attention kernel: head size " + std::to_string(s.D) + " is outside 1.." +          \
             std::to_string(kRelAttnMaxHead);                                                            \
    const bool bf = s.dtype == DType::kBFloat16;                                                         \
    if (s.D <= 64) return bf ? IMPL<bf16, 64>(s, ARGS, stream) : IMPL<float, 64>(s, ARGS, stream);       \
    return bf ? IMPL<bf16, 128>(s, ARGS, stream) : IMPL<float, 128>(s, ARGS, stream);                    \
  } while (0)

std::string rel_attn_forward(const RelAttnShape& s, const RelAttnForwardArgs& a, void* stream) {
  MT_RA_DISPATCH(ra_forward_impl, a);
}

std::string rel_attn_backward(const RelAttnShape& s, const RelAttnBackwardArgs& a, void* stream) {
  MT_RA_DISPATCH(ra_backward_impl, a);
}

}  // namespace mt
