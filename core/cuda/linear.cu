// Linear layer: out = inp @ weight^T + bias through cuBLASLt (bf16 operands, fp32 accumulate,
// bf16 output, the bias in the GEMM's epilogue). Row-major (N,OC) = (N,IC) @ (OC,IC)^T is, in
// cuBLAS's column-major terms, out^T (OC,N) = W (OC,IC) * inp^T (IC,N): A = W transposed,
// B = inp. The activations are the operands as they are; the weight gradients are fp32.
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

constexpr int kRowChunk = 256;  // rows per block of the column sums

// block (32, 8): x is the column within a 32-wide block, y strides the chunk's rows.
__global__ void column_sums_kernel(float* sums,       // (OC) +=
                                   const act_t* x,    // (N,OC)
                                   int N, int OC) {
  __shared__ float part[8][33];  // (8, 32) padded against bank conflicts
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int n0 = blockIdx.y * kRowChunk, n1 = min(N, n0 + kRowChunk);
  float sum = 0.0f;
  if (c < OC)
    for (int n = n0 + threadIdx.y; n < n1; n += blockDim.y)
      sum += act_load(x, static_cast<size_t>(n) * OC + c);
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < OC) {
    for (int j = 1; j < blockDim.y; ++j) sum += part[j][threadIdx.x];
    atomicAdd(sums + c, sum);
  }
}

}  // namespace

void CudaBackend::add_column_sums(float* dbias, const act_t* dout, int N, int OC) {
  if (N == 0 || OC == 0) return;
  note_write(dbias);
  const dim3 grid((OC + 31) / 32, (N + kRowChunk - 1) / kRowChunk), block(32, 8);
  column_sums_kernel<<<grid, block>>>(dbias, dout, N, OC);
  CUDA_CHECK_LAUNCH();
}

GemmCall CudaBackend::linear_forward_call(act_t* out,           // (N,OC)
                                          const act_t* inp,     // (N,IC)
                                          const float* weight,  // (OC,IC)
                                          const float* bias,    // (OC) or nullptr
                                          int N, int IC, int OC) {
  GemmCall g;
  g.trans_a = true;
  g.m = OC;
  g.n = N;
  g.k = IC;
  g.a = bf16_weight(weight, static_cast<size_t>(OC) * IC);
  g.lda = IC;
  g.b = inp;
  g.ldb = IC;
  g.c = out;
  g.c_bf16 = true;
  g.ldc = OC;
  g.bias = bias;
  return g;
}

// dinp (N,IC) += dout (N,OC) @ W (OC,IC):  dinp^T (IC,N) = W^T (IC,OC) * dout^T (OC,N).
GemmCall CudaBackend::linear_dinp_call(act_t* dinp,          // (N,IC)
                                       const act_t* dout,    // (N,OC)
                                       const float* weight,  // (OC,IC)
                                       int N, int IC, int OC) {
  GemmCall g;
  g.m = IC;
  g.n = N;
  g.k = OC;
  g.a = bf16_weight(weight, static_cast<size_t>(OC) * IC);
  g.lda = IC;
  g.b = dout;
  g.ldb = OC;
  g.c = dinp;
  g.c_bf16 = true;
  g.ldc = IC;
  g.beta = 1.0f;
  return g;
}

void CudaBackend::linear_forward(Act* out_act,         // (N,OC)
                                 const Act* inp_act,   // (N,IC)
                                 const float* weight,  // (OC,IC)
                                 const float* bias,    // (OC) or nullptr
                                 int N, int IC, int OC) {
  if (N == 0 || OC == 0) return;
  gemm(linear_forward_call(act_ptr(out_act), act_ptr(inp_act), weight, bias, N, IC, OC));
}

void CudaBackend::linear_backward(Act* dinp_act,        // (N,IC)  += or nullptr
                                  float* dweight,       // (OC,IC) +=
                                  float* dbias,         // (OC)    += or nullptr
                                  const Act* dout_act,  // (N,OC)
                                  const Act* inp_act,   // (N,IC)
                                  const float* weight,  // (OC,IC)
                                  int N, int IC, int OC) {
  act_t* dinp = act_ptr(dinp_act);
  const act_t *dout = act_ptr(dout_act), *inp = act_ptr(inp_act);
  if (N == 0 || OC == 0 || IC == 0) return;
  if (dinp != nullptr) gemm(linear_dinp_call(dinp, dout, weight, N, IC, OC));
  linear_weight_gradients(dweight, dbias, dout, inp, N, IC, OC);
}

void CudaBackend::linear_weight_gradients(float* dweight,     // (OC,IC) +=
                                          float* dbias,       // (OC)    += or nullptr
                                          const act_t* dout,  // (N,OC)
                                          const act_t* inp,   // (N,IC)
                                          int N, int IC, int OC) {
  // dW (OC,IC) += dout^T (OC,N) @ inp (N,IC):  dW^T (IC,OC) = inp^T (IC,N) * dout (N,OC),
  // accumulated in fp32 across micro-batches.
  GemmCall g;
  g.trans_b = true;
  g.m = IC;
  g.n = OC;
  g.k = N;
  g.a = inp;
  g.lda = IC;
  g.b = dout;
  g.ldb = OC;
  g.c = dweight;
  g.ldc = IC;
  g.beta = 1.0f;
  gemm(g);
  if (dbias != nullptr) add_column_sums(dbias, dout, N, OC);
}

}  // namespace moe
