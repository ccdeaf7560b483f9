// Fused causal attention on tensor cores, flash-attention style (FlashAttention-2's split of
// the work), P = softmax(mask(q k^T / sqrt(hd))), out = P v:
//   forward   one block per 64 queries of one (batch, head). It streams the key tiles from 0
//             to the diagonal: S = q k^T (WMMA, bf16 in, fp32 accumulate), an online softmax
//             in fp32 (running max and sum per row, O rescaled when the max grows), O += P v.
//             It saves lse = max + log(sum) per row and writes O / sum straight into (B,T,C).
//   backward  one block per 64 keys. For each query tile from the diagonal on it recomputes
//             P = exp(S - lse), and with dP = dO v^T, delta = rowsum(dO * out):
//             dS = P (dP - delta); dV += P^T dO and dK += dS^T q stay in registers; dQ += dS k
//             goes by atomics into an fp32 buffer that is added to dqkv at the end.
// Nothing of size T x T ever reaches global memory. qkv, out, dout and dqkv are activations
// (bf16, act.cuh): out and dqkv round once per element as they are stored (dqkv's dk and dv
// when a block has its keys' sums, dq when its fp32 sum over every key tile is complete); lse
// stays fp32. The heads go through head-major bf16 copies (B,NH,T,HDP) whose head dim is
// zero-padded to HDP, a multiple of WMMA's 16 (zero columns change neither q k^T nor the used
// columns of P v), so every tile loads as whole 16-byte rows. Head dims up to 128.
#include <mma.h>

#include <cmath>
#include <string>

#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;                 // rows a block owns, and the tile streamed past them
constexpr int kWarps = 4;                 // each warp owns 16 of the block's 64 rows
constexpr int kFlashThreads = kWarps * 32;
constexpr int kMaxHeadDim = 128;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragAColumns = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBColumns = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Shared-memory row strides in elements. The padding (+8 bf16, +4 fp32) spreads rows over
// the banks; WMMA wants a multiple of 8 (16-bit) or 4 (32-bit) elements. Every region below
// is a multiple of 128 bytes, so each WMMA pointer stays 32-byte aligned as WMMA requires.
template <int HDP>
constexpr int kHeadStride = HDP + 8;      // bf16 rows of head-dim width
template <int HDP>
constexpr int kHeadStrideF32 = HDP + 4;   // fp32 rows of head-dim width
constexpr int kTileStride = kTile + 8;    // bf16 rows of tile width
constexpr int kTileStrideF32 = kTile + 4; // fp32 rows of tile width

template <int HDP>
constexpr size_t kHeadTileBytes = size_t{kTile} * kHeadStride<HDP> * 2;      // (64, HDP+8) bf16
template <int HDP>
constexpr size_t kHeadTileBytesF32 = size_t{kTile} * kHeadStrideF32<HDP> * 4; // (64, HDP+4) fp32
constexpr size_t kTileBytes = size_t{kTile} * kTileStride * 2;                // (64, 72) bf16
constexpr size_t kTileBytesF32 = size_t{kTile} * kTileStrideF32 * 4;          // (64, 68) fp32
constexpr size_t kRowBytes = size_t{kTile} * 4;                               // (64) fp32

template <int HDP>
constexpr size_t kForwardSmem =
    3 * kHeadTileBytes<HDP> + kTileBytes + kTileBytesF32 + kHeadTileBytesF32<HDP> + 2 * kRowBytes;
template <int HDP>
constexpr size_t kBackwardSmem = 4 * kHeadTileBytes<HDP> + 2 * kTileBytes + 2 * kTileBytesF32 +
                                 2 * kRowBytes;  // the dQ staging tile reuses q_s and do_s

// q, k, v (B,NH,T,HDP) bf16 from qkv (B,T,3C); head h is columns h*hd..(h+1)*hd of each part;
// columns hd..HDP-1 are zero. A copy: qkv is bf16 already.
__global__ void split_heads_kernel(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v,
                                   const act_t* qkv,  // (B,T,3C)
                                   int B, int T, int C, int NH, int hdp) {
  const int hd = C / NH;
  const size_t total = static_cast<size_t>(B) * NH * T * hdp;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % hdp);
    const size_t row = i / hdp;  // (b*NH + h)*T + t
    const int t = static_cast<int>(row % T);
    const size_t bh = row / T;
    const int h = static_cast<int>(bh % NH), b = static_cast<int>(bh / NH);
    const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
    __nv_bfloat16 qv = zero, kv = zero, vv = zero;
    if (d < hd) {
      const act_t* src = qkv + (static_cast<size_t>(b) * T + t) * 3 * C + h * hd + d;
      qv = src[0];
      kv = src[C];
      vv = src[2 * C];
    }
    q[i] = qv;
    k[i] = kv;
    v[i] = vv;
  }
}

// out (B,NH,T,HDP) bf16 from x (B,T,C), zero-padded like split_heads_kernel (a copy too).
__global__ void split_heads_one_kernel(__nv_bfloat16* out, const act_t* x,  // (B,T,C)
                                       int B, int T, int C, int NH, int hdp) {
  const int hd = C / NH;
  const size_t total = static_cast<size_t>(B) * NH * T * hdp;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % hdp);
    const size_t row = i / hdp;
    const int t = static_cast<int>(row % T);
    const size_t bh = row / T;
    const int h = static_cast<int>(bh % NH), b = static_cast<int>(bh / NH);
    out[i] = d < hd ? x[(static_cast<size_t>(b) * T + t) * C + h * hd + d]
                    : __float2bfloat16_rn(0.0f);
  }
}

// Rows row0..row0+63 of one head's (T,HDP) bf16 matrix into a (64, HDP+8) shared tile, in
// 16-byte vectors (HDP is a multiple of 16, so rows are); rows past T are zero.
template <int HDP>
__device__ void load_head_tile(__nv_bfloat16* tile, const __nv_bfloat16* head, int row0, int T) {
  constexpr int kVectorsPerRow = HDP / 8;  // 8 bf16 in 16 bytes
  for (int i = threadIdx.x; i < kTile * kVectorsPerRow; i += blockDim.x) {
    const int r = i / kVectorsPerRow, c = (i % kVectorsPerRow) * 8;
    int4 value = make_int4(0, 0, 0, 0);
    if (row0 + r < T)
      value = *reinterpret_cast<const int4*>(head + static_cast<size_t>(row0 + r) * HDP + c);
    *reinterpret_cast<int4*>(tile + r * kHeadStride<HDP> + c) = value;
  }
}

template <int HDP>
__global__ void __launch_bounds__(kFlashThreads)
    flash_forward_kernel(act_t* out,                // (B,T,C)
                         float* lse,                // (B,NH,T)
                         const __nv_bfloat16* q,    // (B,NH,T,HDP)
                         const __nv_bfloat16* k,    // (B,NH,T,HDP)
                         const __nv_bfloat16* v,    // (B,NH,T,HDP)
                         int T, int C, int NH, int hd, float scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem);                   // (64, HDP+8)
  auto* k_s = q_s + kTile * kHeadStride<HDP>;                           // (64, HDP+8)
  auto* v_s = k_s + kTile * kHeadStride<HDP>;                           // (64, HDP+8)
  auto* p_s = v_s + kTile * kHeadStride<HDP>;                           // (64, 72) bf16 P
  auto* s_s = reinterpret_cast<float*>(p_s + kTile * kTileStride);      // (64, 68) scores
  auto* o_s = s_s + kTile * kTileStrideF32;                             // (64, HDP+4) O
  float* row_max = o_s + kTile * kHeadStrideF32<HDP>;                   // (64)
  float* row_sum = row_max + kTile;                                     // (64)

  // The last query tiles see the most keys: they get the lowest block index, so they start
  // first.
  const int bh = blockIdx.x;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp * 16;  // this warp's first row in the block
  const size_t head = static_cast<size_t>(bh) * T * HDP;
  load_head_tile<HDP>(q_s, q + head, q0, T);
  for (int i = threadIdx.x; i < kTile * kHeadStrideF32<HDP>; i += blockDim.x) o_s[i] = 0.0f;
  if (threadIdx.x < kTile) {
    row_max[threadIdx.x] = -INFINITY;
    row_sum[threadIdx.x] = 0.0f;
  }
  float* s_w = s_s + wr * kTileStrideF32;             // (16, 68) this warp's scores
  __nv_bfloat16* p_w = p_s + wr * kTileStride;        // (16, 72) this warp's P
  float* o_w = o_s + wr * kHeadStrideF32<HDP>;        // (16, HDP+4) this warp's O

  for (int k0 = 0; k0 <= q0; k0 += kTile) {
    __syncthreads();  // nobody reads the previous k_s, v_s any more (and q_s, o_s are set)
    load_head_tile<HDP>(k_s, k + head, k0, T);
    load_head_tile<HDP>(v_s, v + head, k0, T);
    __syncthreads();
    // S (16,64) = q rows (16,HDP) @ k^T (HDP,64); k_s read column-major is k^T.
#pragma unroll
    for (int n = 0; n < kTile / 16; ++n) {
      FragAcc acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int d = 0; d < HDP / 16; ++d) {
        FragA a;
        FragBColumns b;
        wmma::load_matrix_sync(a, q_s + wr * kHeadStride<HDP> + d * 16, kHeadStride<HDP>);
        wmma::load_matrix_sync(b, k_s + n * 16 * kHeadStride<HDP> + d * 16, kHeadStride<HDP>);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_w + n * 16, acc, kTileStrideF32, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax, a row at a time; each lane holds 2 of the row's 64 keys.
    for (int r = 0; r < 16; ++r) {
      const int t = q0 + wr + r;
      float s[2];
      float tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = k0 + lane + 32 * c;
        s[c] = key <= t && key < T ? s_w[r * kTileStrideF32 + lane + 32 * c] * scale : -INFINITY;
        tile_max = fmaxf(tile_max, s[c]);
      }
      tile_max = cuda::warp_max(tile_max);
      const float old_max = row_max[wr + r];
      const float new_max = fmaxf(old_max, tile_max);
      // Key k0 <= q0 <= t is always visible, so new_max is finite; the guard keeps a fully
      // masked row at zeros instead of NaN should that ever change.
      const float shift = new_max == -INFINITY ? 0.0f : new_max;
      float tile_sum = 0.0f;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float p = __expf(s[c] - shift);  // masked keys: exp(-inf) = 0
        tile_sum += p;
        p_w[r * kTileStride + lane + 32 * c] = __float2bfloat16_rn(p);
      }
      tile_sum = cuda::warp_sum(tile_sum);
      const float rescale = __expf(old_max - shift);  // 0 on the first tile
      for (int d = lane; d < HDP; d += 32) o_w[r * kHeadStrideF32<HDP> + d] *= rescale;
      __syncwarp();  // every lane has read row_max[wr + r]
      if (lane == 0) {
        row_max[wr + r] = new_max;
        row_sum[wr + r] = row_sum[wr + r] * rescale + tile_sum;
      }
    }
    __syncwarp();
    // O (16,HDP) += P (16,64) @ v (64,HDP)
#pragma unroll
    for (int n = 0; n < HDP / 16; ++n) {
      FragAcc acc;
      wmma::load_matrix_sync(acc, o_w + n * 16, kHeadStrideF32<HDP>, wmma::mem_row_major);
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) {
        FragA a;
        FragB b;
        wmma::load_matrix_sync(a, p_w + j * 16, kTileStride);
        wmma::load_matrix_sync(b, v_s + j * 16 * kHeadStride<HDP> + n * 16, kHeadStride<HDP>);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(o_w + n * 16, acc, kHeadStrideF32<HDP>, wmma::mem_row_major);
    }
  }
  __syncwarp();
  // This warp's rows: out = O / sum at the head's columns of (B,T,C); lse = max + log(sum).
  const int b = bh / NH, h = bh % NH;
  for (int r = 0; r < 16; ++r) {
    const int t = q0 + wr + r;
    if (t >= T) break;
    const float inv_sum = 1.0f / row_sum[wr + r];
    act_t* out_row = out + (static_cast<size_t>(b) * T + t) * C + h * hd;  // (hd)
    for (int d = lane; d < hd; d += 32)
      act_store(out_row, d, o_w[r * kHeadStrideF32<HDP> + d] * inv_sum);
    if (lane == 0) lse[static_cast<size_t>(bh) * T + t] = row_max[wr + r] + logf(row_sum[wr + r]);
  }
}

// delta (B,NH,T) = rowsum(out * dout) per head: one warp per (b, h, t).
__global__ void attention_delta_kernel(float* delta, const act_t* out,  // (B,T,C)
                                       const act_t* dout,                // (B,T,C)
                                       int B, int T, int C, int NH) {
  const size_t row = static_cast<size_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<size_t>(B) * NH * T) return;
  const int hd = C / NH;
  const int t = static_cast<int>(row % T);
  const size_t bh = row / T;
  const int h = static_cast<int>(bh % NH), b = static_cast<int>(bh / NH);
  const size_t base = (static_cast<size_t>(b) * T + t) * C + h * hd;
  float sum = 0.0f;
  for (int d = lane; d < hd; d += 32) sum += act_load(out, base + d) * act_load(dout, base + d);
  sum = cuda::warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// dqkv (B,T,3C) columns column..column+hd of each row += factor * rows of this warp's
// (16, HDP+4) staging tile, for keys/queries below T. Each element has this one writer.
template <int HDP>
__device__ void add_staged_rows(act_t* dqkv, const float* stage_w, int row0, int T, int C,
                                int b, int column, int hd, float factor) {
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < 16 * hd; i += 32) {
    const int r = i / hd, d = i % hd;
    if (row0 + r < T)
      act_accumulate(dqkv, (static_cast<size_t>(b) * T + row0 + r) * 3 * C + column + d,
                     factor * stage_w[r * kHeadStrideF32<HDP> + d]);
  }
}

template <int HDP>
__global__ void __launch_bounds__(kFlashThreads)
    flash_backward_kernel(act_t* dqkv,                 // (B,T,3C) += dk, dv
                          float* dq,                   // (B,NH,T,HDP) += dS k (unscaled)
                          const __nv_bfloat16* q,      // (B,NH,T,HDP)
                          const __nv_bfloat16* k,      // (B,NH,T,HDP)
                          const __nv_bfloat16* v,      // (B,NH,T,HDP)
                          const __nv_bfloat16* dout,   // (B,NH,T,HDP)
                          const float* lse,            // (B,NH,T)
                          const float* delta,          // (B,NH,T)
                          int T, int C, int NH, int hd, float scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  auto* k_s = reinterpret_cast<__nv_bfloat16*>(smem);                   // (64, HDP+8) keys
  auto* v_s = k_s + kTile * kHeadStride<HDP>;                           // (64, HDP+8)
  auto* q_s = v_s + kTile * kHeadStride<HDP>;                           // (64, HDP+8) queries
  auto* do_s = q_s + kTile * kHeadStride<HDP>;                          // (64, HDP+8)
  auto* pt_s = do_s + kTile * kHeadStride<HDP>;                         // (64, 72) P^T
  auto* dst_s = pt_s + kTile * kTileStride;                             // (64, 72) dS^T
  auto* st_s = reinterpret_cast<float*>(dst_s + kTile * kTileStride);   // (64, 68) S^T
  float* dpt_s = st_s + kTile * kTileStrideF32;                         // (64, 68) dP^T
  // (64, HDP+4) dQ / dK / dV staging. It reuses q_s and do_s, which nobody reads between the
  // barrier before the dQ product and the next tile's barrier after which they are reloaded.
  static_assert(kHeadTileBytesF32<HDP> <= 2 * kHeadTileBytes<HDP>, "stage_s fits in q_s, do_s");
  float* stage_s = reinterpret_cast<float*>(q_s);
  float* lse_s = dpt_s + kTile * kTileStrideF32;                        // (64)
  float* delta_s = lse_s + kTile;                                       // (64)

  const int bh = blockIdx.x, k0 = blockIdx.y * kTile;  // low k0: most query tiles, first
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp * 16;  // this warp's first key in the block
  const size_t head = static_cast<size_t>(bh) * T * HDP;
  __nv_bfloat16* pt_w = pt_s + wr * kTileStride;        // (16, 72)
  __nv_bfloat16* dst_w = dst_s + wr * kTileStride;      // (16, 72)
  float* st_w = st_s + wr * kTileStrideF32;             // (16, 68)
  float* dpt_w = dpt_s + wr * kTileStrideF32;           // (16, 68)
  float* stage_w = stage_s + wr * kHeadStrideF32<HDP>;  // (16, HDP+4)

  load_head_tile<HDP>(k_s, k + head, k0, T);
  load_head_tile<HDP>(v_s, v + head, k0, T);
  FragAcc dk_acc[HDP / 16], dv_acc[HDP / 16];  // this warp's 16 keys x HDP
#pragma unroll
  for (int n = 0; n < HDP / 16; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.0f);
    wmma::fill_fragment(dv_acc[n], 0.0f);
  }

  for (int q0 = k0; q0 < T; q0 += kTile) {
    __syncthreads();  // every warp is done with stage_s (= q_s, do_s) of the previous tile
    load_head_tile<HDP>(q_s, q + head, q0, T);
    load_head_tile<HDP>(do_s, dout + head, q0, T);
    if (threadIdx.x < kTile) {
      const int t = q0 + threadIdx.x;
      lse_s[threadIdx.x] = t < T ? lse[static_cast<size_t>(bh) * T + t] : 0.0f;
      delta_s[threadIdx.x] = t < T ? delta[static_cast<size_t>(bh) * T + t] : 0.0f;
    }
    __syncthreads();
    // S^T (16 keys, 64 queries) = k rows @ q^T;  dP^T = v rows @ dO^T.
#pragma unroll
    for (int n = 0; n < kTile / 16; ++n) {
      FragAcc s_acc, dp_acc;
      wmma::fill_fragment(s_acc, 0.0f);
      wmma::fill_fragment(dp_acc, 0.0f);
#pragma unroll
      for (int d = 0; d < HDP / 16; ++d) {
        FragA k_frag, v_frag;
        FragBColumns q_frag, do_frag;
        wmma::load_matrix_sync(k_frag, k_s + wr * kHeadStride<HDP> + d * 16, kHeadStride<HDP>);
        wmma::load_matrix_sync(v_frag, v_s + wr * kHeadStride<HDP> + d * 16, kHeadStride<HDP>);
        wmma::load_matrix_sync(q_frag, q_s + n * 16 * kHeadStride<HDP> + d * 16,
                               kHeadStride<HDP>);
        wmma::load_matrix_sync(do_frag, do_s + n * 16 * kHeadStride<HDP> + d * 16,
                               kHeadStride<HDP>);
        wmma::mma_sync(s_acc, k_frag, q_frag, s_acc);
        wmma::mma_sync(dp_acc, v_frag, do_frag, dp_acc);
      }
      wmma::store_matrix_sync(st_w + n * 16, s_acc, kTileStrideF32, wmma::mem_row_major);
      wmma::store_matrix_sync(dpt_w + n * 16, dp_acc, kTileStrideF32, wmma::mem_row_major);
    }
    __syncwarp();
    // P^T and dS^T; a (key, query) pair counts when key <= query < T (which implies key < T).
    for (int i = lane; i < 16 * kTile; i += 32) {
      const int r = i / kTile, c = i % kTile;
      const int key = k0 + wr + r, t = q0 + c;
      float p = 0.0f, ds = 0.0f;
      if (key <= t && t < T) {
        p = __expf(st_w[r * kTileStrideF32 + c] * scale - lse_s[c]);
        ds = p * (dpt_w[r * kTileStrideF32 + c] - delta_s[c]);
      }
      pt_w[r * kTileStride + c] = __float2bfloat16_rn(p);
      dst_w[r * kTileStride + c] = __float2bfloat16_rn(ds);
    }
    __syncwarp();
    // dV (16,HDP) += P^T (16,64) @ dO (64,HDP);  dK (16,HDP) += dS^T (16,64) @ q (64,HDP)
#pragma unroll
    for (int n = 0; n < HDP / 16; ++n) {
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) {
        FragA p_frag, ds_frag;
        FragB do_frag, q_frag;
        wmma::load_matrix_sync(p_frag, pt_w + j * 16, kTileStride);
        wmma::load_matrix_sync(ds_frag, dst_w + j * 16, kTileStride);
        wmma::load_matrix_sync(do_frag, do_s + j * 16 * kHeadStride<HDP> + n * 16,
                               kHeadStride<HDP>);
        wmma::load_matrix_sync(q_frag, q_s + j * 16 * kHeadStride<HDP> + n * 16,
                               kHeadStride<HDP>);
        wmma::mma_sync(dv_acc[n], p_frag, do_frag, dv_acc[n]);
        wmma::mma_sync(dk_acc[n], ds_frag, q_frag, dk_acc[n]);
      }
    }
    __syncthreads();  // every warp's rows of dS^T are in dst_s
    // dQ for queries q0+wr..+16 (16,HDP) = dS (16 queries, 64 keys) @ k (64,HDP); dst_s read
    // column-major is dS.
#pragma unroll
    for (int n = 0; n < HDP / 16; ++n) {
      FragAcc acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) {
        FragAColumns ds_frag;
        FragB k_frag;
        wmma::load_matrix_sync(ds_frag, dst_s + j * 16 * kTileStride + wr, kTileStride);
        wmma::load_matrix_sync(k_frag, k_s + j * 16 * kHeadStride<HDP> + n * 16,
                               kHeadStride<HDP>);
        wmma::mma_sync(acc, ds_frag, k_frag, acc);
      }
      wmma::store_matrix_sync(stage_w + n * 16, acc, kHeadStrideF32<HDP>, wmma::mem_row_major);
    }
    __syncwarp();
    for (int i = lane; i < 16 * HDP; i += 32) {
      const int r = i / HDP, d = i % HDP, t = q0 + wr + r;
      if (t < T && d < hd)
        atomicAdd(dq + (static_cast<size_t>(bh) * T + t) * HDP + d,
                  stage_w[r * kHeadStrideF32<HDP> + d]);
    }
    __syncwarp();  // stage_w is rewritten next tile
  }

  // This block owns its keys: dK and dV go straight into dqkv, no atomics.
  const int b = bh / NH, h = bh % NH;
#pragma unroll
  for (int n = 0; n < HDP / 16; ++n)
    wmma::store_matrix_sync(stage_w + n * 16, dk_acc[n], kHeadStrideF32<HDP>, wmma::mem_row_major);
  __syncwarp();
  add_staged_rows<HDP>(dqkv, stage_w, k0 + wr, T, C, b, C + h * hd, hd, scale);
  __syncwarp();
#pragma unroll
  for (int n = 0; n < HDP / 16; ++n)
    wmma::store_matrix_sync(stage_w + n * 16, dv_acc[n], kHeadStrideF32<HDP>, wmma::mem_row_major);
  __syncwarp();
  add_staged_rows<HDP>(dqkv, stage_w, k0 + wr, T, C, b, 2 * C + h * hd, hd, 1.0f);
}

// dqkv (B,T,3C) q columns += scale * dq (B,NH,T,HDP), one thread per element.
__global__ void add_dq_kernel(act_t* dqkv, const float* dq, int B, int T, int C, int NH,
                              int hdp, float scale) {
  const int hd = C / NH;
  const size_t total = static_cast<size_t>(B) * T * C;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % C);
    const size_t bt = i / C;
    const int t = static_cast<int>(bt % T), b = static_cast<int>(bt / T);
    const int h = c / hd, d = c % hd;
    act_accumulate(dqkv, bt * 3 * C + c,
                   scale * dq[((static_cast<size_t>(b) * NH + h) * T + t) * hdp + d]);
  }
}

// The padded head dim the kernels are instantiated for: 16, 32, 64 or 128.
int padded_head_dim(int hd) {
  if (hd > kMaxHeadDim)
    throw RuntimeError("the CUDA attention supports head dims up to " +
                       std::to_string(kMaxHeadDim) + "; this model has " + std::to_string(hd) +
                       " (--hidden-size / --num-attention-heads)");
  int hdp = 16;
  while (hdp < hd) hdp *= 2;
  return hdp;
}

// Lets `kernel` use `bytes` of dynamic shared memory (past 48 KiB a kernel must ask), or says
// plainly that this GPU has too little (e.g. sm_86/sm_89: 99 KiB per block).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, const char* what) {
  int device = 0, limit = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit))
    throw RuntimeError(std::string(what) + " needs " + std::to_string(bytes) +
                       " bytes of shared memory per block for this head dim; this GPU allows " +
                       std::to_string(limit));
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
}

// Grid: x over the B*NH heads (no 65535 limit there), y over the 64-row tiles.
dim3 flash_grid(int B, int T, int NH) {
  return dim3(static_cast<unsigned>(B * NH), static_cast<unsigned>((T + kTile - 1) / kTile));
}

template <int HDP>
void launch_forward(act_t* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                    const __nv_bfloat16* v, int B, int T, int C, int NH, float scale) {
  constexpr size_t smem_bytes = kForwardSmem<HDP>;
  allow_shared_memory(flash_forward_kernel<HDP>, smem_bytes, "attention_forward");
  flash_forward_kernel<HDP><<<flash_grid(B, T, NH), kFlashThreads, smem_bytes>>>(
      out, lse, q, k, v, T, C, NH, C / NH, scale);
  CUDA_CHECK_LAUNCH();
}

template <int HDP>
void launch_backward(act_t* dqkv, float* dq, const __nv_bfloat16* q, const __nv_bfloat16* k,
                     const __nv_bfloat16* v, const __nv_bfloat16* dout, const float* lse,
                     const float* delta, int B, int T, int C, int NH, float scale) {
  constexpr size_t smem_bytes = kBackwardSmem<HDP>;
  allow_shared_memory(flash_backward_kernel<HDP>, smem_bytes, "attention_backward");
  flash_backward_kernel<HDP><<<flash_grid(B, T, NH), kFlashThreads, smem_bytes>>>(
      dqkv, dq, q, k, v, dout, lse, delta, T, C, NH, C / NH, scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void CudaBackend::attention_forward(Act* out_act,        // (B,T,C)
                                    float* lse,          // (B,NH,T)
                                    const Act* qkv_act,  // (B,T,3C)
                                    int B, int T, int C, int NH) {
  act_t* out = act_ptr(out_act);
  const act_t* qkv = act_ptr(qkv_act);
  if (B * T == 0) return;
  note_write(out);
  note_write(lse);
  const int hd = C / NH, hdp = padded_head_dim(hd);
  const size_t padded = static_cast<size_t>(B) * NH * T * hdp;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto* q = static_cast<__nv_bfloat16*>(scratch(kBf16Q, padded * 2));  // (B,NH,T,HDP)
  auto* k = static_cast<__nv_bfloat16*>(scratch(kBf16K, padded * 2));  // (B,NH,T,HDP)
  auto* v = static_cast<__nv_bfloat16*>(scratch(kBf16V, padded * 2));  // (B,NH,T,HDP)
  split_heads_kernel<<<grid_for(padded), kThreads>>>(q, k, v, qkv, B, T, C, NH, hdp);
  CUDA_CHECK_LAUNCH();
  switch (hdp) {
    case 16: launch_forward<16>(out, lse, q, k, v, B, T, C, NH, scale); break;
    case 32: launch_forward<32>(out, lse, q, k, v, B, T, C, NH, scale); break;
    case 64: launch_forward<64>(out, lse, q, k, v, B, T, C, NH, scale); break;
    default: launch_forward<128>(out, lse, q, k, v, B, T, C, NH, scale); break;
  }
}

void CudaBackend::attention_backward(Act* dqkv_act,        // (B,T,3C) +=
                                     const Act* dout_act,  // (B,T,C)
                                     const Act* out_act,   // (B,T,C)
                                     const Act* qkv_act,   // (B,T,3C)
                                     const float* lse,     // (B,NH,T)
                                     int B, int T, int C, int NH) {
  act_t* dqkv = act_ptr(dqkv_act);
  const act_t *dout = act_ptr(dout_act), *out = act_ptr(out_act), *qkv = act_ptr(qkv_act);
  if (B * T == 0) return;
  note_write(dqkv);
  const int hd = C / NH, hdp = padded_head_dim(hd);
  const size_t padded = static_cast<size_t>(B) * NH * T * hdp;
  const size_t rows = static_cast<size_t>(B) * NH * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto* q = static_cast<__nv_bfloat16*>(scratch(kBf16Q, padded * 2));      // (B,NH,T,HDP)
  auto* k = static_cast<__nv_bfloat16*>(scratch(kBf16K, padded * 2));      // (B,NH,T,HDP)
  auto* v = static_cast<__nv_bfloat16*>(scratch(kBf16V, padded * 2));      // (B,NH,T,HDP)
  auto* dy = static_cast<__nv_bfloat16*>(scratch(kBf16Dout, padded * 2));  // (B,NH,T,HDP)
  auto* delta = static_cast<float*>(scratch(kF32Delta, rows * 4));         // (B,NH,T)
  auto* dq = static_cast<float*>(scratch(kF32Dq, padded * 4));             // (B,NH,T,HDP)
  split_heads_kernel<<<grid_for(padded), kThreads>>>(q, k, v, qkv, B, T, C, NH, hdp);
  CUDA_CHECK_LAUNCH();
  split_heads_one_kernel<<<grid_for(padded), kThreads>>>(dy, dout, B, T, C, NH, hdp);
  CUDA_CHECK_LAUNCH();
  const int warps = kThreads / 32;
  attention_delta_kernel<<<static_cast<unsigned>((rows + warps - 1) / warps), kThreads>>>(
      delta, out, dout, B, T, C, NH);
  CUDA_CHECK_LAUNCH();
  CUDA_CHECK(cudaMemsetAsync(dq, 0, padded * 4, 0));
  switch (hdp) {
    case 16: launch_backward<16>(dqkv, dq, q, k, v, dy, lse, delta, B, T, C, NH, scale); break;
    case 32: launch_backward<32>(dqkv, dq, q, k, v, dy, lse, delta, B, T, C, NH, scale); break;
    case 64: launch_backward<64>(dqkv, dq, q, k, v, dy, lse, delta, B, T, C, NH, scale); break;
    default: launch_backward<128>(dqkv, dq, q, k, v, dy, lse, delta, B, T, C, NH, scale); break;
  }
  add_dq_kernel<<<grid_for(static_cast<size_t>(B) * T * C), kThreads>>>(dqkv, dq, B, T, C, NH,
                                                                        hdp, scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
