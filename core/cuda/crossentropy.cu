// Softmax cross-entropy per row, one block per row (V up to ~50k): losses[i] =
// logsumexp(logits[i]) - logits[i, targets[i]]; probs may alias logits (the model overwrites
// its largest activation in place), so the target logit is read before any write.
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

__global__ void crossentropy_forward_kernel(float* losses,        // (N)
                                            float* probs,         // (N,V) may alias logits
                                            const float* logits,  // (N,V)
                                            const int* targets,   // (N)
                                            int V) {
  const int i = blockIdx.x;
  const float* x = logits + static_cast<size_t>(i) * V;  // (V)
  float* p = probs + static_cast<size_t>(i) * V;         // (V)
  const float target_logit = x[targets[i]];
  float max = -INFINITY;
  for (int j = threadIdx.x; j < V; j += blockDim.x) max = fmaxf(max, x[j]);
  max = cuda::block_max(max);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < V; j += blockDim.x) sum += __expf(x[j] - max);
  sum = cuda::block_sum(sum);  // every thread has read its x[j] before any writes below
  const float inv_sum = 1.0f / sum;
  for (int j = threadIdx.x; j < V; j += blockDim.x) p[j] = __expf(x[j] - max) * inv_sum;
  // max - target_logit first: the rounding of the sum stays at the loss's magnitude, not
  // max's (a confident prediction has a loss near 0 and max far from 0).
  if (threadIdx.x == 0) losses[i] = (max - target_logit) + logf(sum);
}

// dlogits = (probs - onehot(target)) * dloss, written (may alias probs).
__global__ void crossentropy_backward_kernel(float* dlogits,      // (N,V)
                                             const float* probs,  // (N,V)
                                             const int* targets,  // (N)
                                             float dloss, int V) {
  const int i = blockIdx.x;
  const float* p = probs + static_cast<size_t>(i) * V;  // (V)
  float* d = dlogits + static_cast<size_t>(i) * V;      // (V)
  const int target = targets[i];
  for (int j = threadIdx.x; j < V; j += blockDim.x)
    d[j] = (p[j] - (j == target ? 1.0f : 0.0f)) * dloss;
}

}  // namespace

void CudaBackend::crossentropy_forward(float* losses,          // (N)
                                       Act* probs_act,         // (N,V) may alias logits
                                       const Act* logits_act,  // (N,V)
                                       const int* targets,     // (N)
                                       int N, int V) {
  float* probs = act_f32(probs_act);
  const float* logits = act_f32(logits_act);
  if (N == 0) return;
  note_write(losses);
  note_write(probs);
  crossentropy_forward_kernel<<<N, 1024>>>(losses, probs, logits, targets, V);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::crossentropy_backward(Act* dlogits_act,      // (N,V) may alias probs
                                        const Act* probs_act,  // (N,V)
                                        const int* targets,    // (N)
                                        float dloss, int N, int V) {
  float* dlogits = act_f32(dlogits_act);
  const float* probs = act_f32(probs_act);
  if (N == 0) return;
  note_write(dlogits);
  crossentropy_backward_kernel<<<N, kThreads>>>(dlogits, probs, targets, dloss, V);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
