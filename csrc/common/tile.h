// Block-level fp32 tile arithmetic shared by the memtrain kernels (256 threads per block).
//
// Matrices live in shared memory as fp32 with a padded leading dimension (a row of 32 floats is stored in
// 33, a C x C matrix with C + 1), so that both a matrix and its transpose can be read without bank
// conflicts.  A product's result lives in registers, spread over the block's threads as a Frag:
// thread t = 16 * ty + tx owns rows ty, ty + 16, ... and columns tx, tx + 16, ... of an M x N result
// (M and N multiples of 16), i.e. a (M/16) x (N/16) register tile.  Products are plain fp32 FMA loops; no
// tensor cores.
#pragma once

#include "mt_cuda.h"

namespace mt {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kTile = 32;      // tile width along head dimensions
constexpr int kTileLd = kTile + 1;

MT_DEV int lane_ty() { return static_cast<int>(threadIdx.x) >> 4; }
MT_DEV int lane_tx() { return static_cast<int>(threadIdx.x) & 15; }

// A view of an fp32 matrix in shared (or global) memory: element (r, c) at p[r * rs + c * cs].
// Transposing swaps the strides.
struct View {
  float* p;
  int rs, cs;
  MT_DEV float& operator()(int r, int c) const { return p[r * rs + c * cs]; }
  MT_DEV View t() const { return View{p, cs, rs}; }
  MT_DEV View rows_from(int r0) const { return View{p + r0 * rs, rs, cs}; }
};

MT_DEV View rowmajor(float* p, int ld) { return View{p, ld, 1}; }

template <int M, int N>
struct Frag {
  static_assert(M % 16 == 0 && N % 16 == 0, "Frag dimensions must be multiples of 16");
  static constexpr int RA = M / 16, RB = N / 16;
  float x[RA][RB];

  MT_DEV static int row(int a) { return lane_ty() + 16 * a; }
  MT_DEV static int col(int b) { return lane_tx() + 16 * b; }

  MT_DEV void zero() {
    for (int a = 0; a < RA; ++a)
      for (int b = 0; b < RB; ++b) x[a][b] = 0.f;
  }
  // this += A[M x K] * B[K x N]
  MT_DEV void mma(View A, View B, int K) {
    for (int k = 0; k < K; ++k) {
      float av[RA], bv[RB];
      for (int a = 0; a < RA; ++a) av[a] = A(row(a), k);
      for (int b = 0; b < RB; ++b) bv[b] = B(k, col(b));
      for (int a = 0; a < RA; ++a)
        for (int b = 0; b < RB; ++b) x[a][b] += av[a] * bv[b];
    }
  }
  // dst(r, c) = this (every element of the M x N tile)
  MT_DEV void store(View dst) const {
    for (int a = 0; a < RA; ++a)
      for (int b = 0; b < RB; ++b) dst(row(a), col(b)) = x[a][b];
  }
  MT_DEV void load(View src) {
    for (int a = 0; a < RA; ++a)
      for (int b = 0; b < RB; ++b) x[a][b] = src(row(a), col(b));
  }
  MT_DEV void add_to(View dst) const {
    for (int a = 0; a < RA; ++a)
      for (int b = 0; b < RB; ++b) dst(row(a), col(b)) += x[a][b];
  }
  MT_DEV void scale(float s) {
    for (int a = 0; a < RA; ++a)
      for (int b = 0; b < RB; ++b) x[a][b] *= s;
  }
};

// Load a rows x cols tile (rows, cols: compile-time tile sizes) of a row-major global matrix src (leading
// dimension ld_src) into shared memory dst (leading dimension ld_dst) as fp32, times row_scale[r] when
// given; elements outside rows_valid x cols_valid are zero.  All threads of the block take part.
template <typename T>
MT_DEV void load_tile(float* dst, int ld_dst, const T* src, int ld_src, int rows, int cols, int rows_valid,
                      int cols_valid, float scale = 1.f, const float* row_scale = nullptr) {
  for (int e = static_cast<int>(threadIdx.x); e < rows * cols; e += kThreads) {
    const int r = e / cols, c = e % cols;
    float val = 0.f;
    if (r < rows_valid && c < cols_valid) {
      val = to_float(src[static_cast<int64_t>(r) * ld_src + c]) * scale;
      if (row_scale) val *= row_scale[r];
    }
    dst[r * ld_dst + c] = val;
  }
}

// Store a Frag (times `scale`) into a row-major global matrix (leading dimension ld) of type T, only the
// elements inside rows_valid x cols_valid.
template <typename T, int M, int N>
MT_DEV void store_frag(const Frag<M, N>& f, T* dst, int ld, int rows_valid, int cols_valid, float scale = 1.f) {
  for (int a = 0; a < Frag<M, N>::RA; ++a) {
    const int r = Frag<M, N>::row(a);
    if (r >= rows_valid) continue;
    for (int b = 0; b < Frag<M, N>::RB; ++b) {
      const int c = Frag<M, N>::col(b);
      if (c < cols_valid) dst[static_cast<int64_t>(r) * ld + c] = from_float<T>(f.x[a][b] * scale);
    }
  }
}

// Copy a rows x cols fp32 matrix from shared memory (leading dimension ld_src) to global memory of type T
// (leading dimension ld), only inside rows_valid x cols_valid.
template <typename T>
MT_DEV void store_smem(const float* src, int ld_src, T* dst, int ld, int rows, int cols, int rows_valid,
                       int cols_valid) {
  for (int e = static_cast<int>(threadIdx.x); e < rows * cols; e += kThreads) {
    const int r = e / cols, c = e % cols;
    if (r < rows_valid && c < cols_valid) dst[static_cast<int64_t>(r) * ld + c] = from_float<T>(src[r * ld_src + c]);
  }
}

// out[r] += sum over c < cols of src[r * ld + c], for r < rows (threads 0 .. rows-1; deterministic order).
MT_DEV void rowsum_add(const float* src, int ld, int rows, int cols, float* out) {
  const int r = static_cast<int>(threadIdx.x);
  if (r < rows) {
    float s = 0.f;
    for (int c = 0; c < cols; ++c) s += src[r * ld + c];
    out[r] += s;
  }
}

}  // namespace mt
