// Portability layer of the memtrain kernels: the same kernel source compiles
//   * with nvcc, as CUDA (the real kernels), or
//   * with a plain C++ compiler and MT_EMULATE defined, as C++ run by the block emulator of emulate.h
//     (every CUDA thread of a block is a fiber, __syncthreads() a scheduling point), so that the indexing and
//     the algebra of a kernel can be checked against the PyTorch references on a machine without a GPU.
//
// Kernels written against this header use only: __global__/__device__ functions, 1-D thread blocks,
// blockIdx.{x,y,z}, threadIdx.x, dynamic shared memory (MT_DYNAMIC_SMEM), __syncthreads(), atomicAdd on
// float global memory, and the float math of <cmath>.  No warp-level primitives (shuffles, votes): they have
// no meaning in the emulator, whose threads are not grouped into warps.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#ifdef MT_EMULATE
#include "emulate.h"
#define MT_HD inline
#define MT_DEV inline
#define MT_GLOBAL inline
#define MT_DYNAMIC_SMEM(name) float* name = ::mt_emu::dynamic_smem()
using ::mt_emu::blockIdx;
using ::mt_emu::threadIdx;
inline void __syncthreads() { ::mt_emu::syncthreads(); }
inline float atomicAdd(float* address, float val) {
  // fibers of the emulator never run concurrently: a plain read-modify-write is atomic
  float old = *address;
  *address = old + val;
  return old;
}
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#define MT_HD __host__ __device__ __forceinline__
#define MT_DEV __device__ __forceinline__
// every kernel runs 256-thread blocks (common/tile.h: kThreads)
#define MT_GLOBAL __global__ __launch_bounds__(256)
#define MT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) float name[]
#endif

namespace mt {

// Element types of the kernels' inputs and outputs (the arithmetic is always fp32).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

#ifdef MT_EMULATE
// bfloat16 storage: the upper 16 bits of an IEEE float, rounded to nearest even (as __float2bfloat16).
struct bf16 {
  uint16_t bits;
};
inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16 bf16_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
#else
using bf16 = __nv_bfloat16;
MT_DEV float to_float(bf16 x) { return __bfloat162float(x); }
MT_DEV bf16 bf16_from_float(float f) { return __float2bfloat16(f); }  // round to nearest even
#endif

MT_DEV float to_float(float x) { return x; }

template <typename T>
MT_DEV T from_float(float x);
template <>
MT_DEV float from_float<float>(float x) { return x; }
template <>
MT_DEV bf16 from_float<bf16>(float x) { return bf16_from_float(x); }

MT_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }
MT_HD int imin(int a, int b) { return a < b ? a : b; }
MT_HD int imax(int a, int b) { return a > b ? a : b; }

}  // namespace mt

// ----------------------------------------------------------------------------------------------------------
// Launching.  MT_LAUNCH(kernel, grid, threads, smem_bytes, stream, args...) starts a kernel on a CUDA stream
// (a cudaStream_t passed as void*) or, emulated, runs its blocks one after the other on the calling thread.
// mt::launch_error() returns "" or the CUDA error of the last launch.  mt::allow_smem(kernel, bytes) raises
// a kernel's dynamic shared-memory limit above the default 48 KiB (it returns an error text when the device
// cannot give that much).
#ifdef MT_EMULATE
#define MT_LAUNCH(kernel, grid, threads, smem, stream, ...) \
  ::mt_emu::launch((grid), (threads), (smem), [&]() { kernel(__VA_ARGS__); })
namespace mt {
inline std::string launch_error() { return ""; }
template <typename K>
inline std::string allow_smem(K, size_t) { return ""; }
using dim3 = ::mt_emu::dim3;
}  // namespace mt
#else
#define MT_LAUNCH(kernel, grid, threads, smem, stream, ...) \
  kernel<<<(grid), (threads), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
namespace mt {
inline std::string launch_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string("CUDA error: ") + cudaGetErrorString(e);
}
template <typename K>
inline std::string allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return "";
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (bytes > static_cast<size_t>(optin))
    return "kernel needs " + std::to_string(bytes) + " bytes of shared memory, the device allows " +
           std::to_string(optin);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return e == cudaSuccess ? std::string() : std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
}
using ::dim3;
}  // namespace mt
#endif
