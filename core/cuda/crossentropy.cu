// Softmax cross-entropy per row, one block per row (V up to ~50k): losses[i] =
// logsumexp(logits[i]) - logits[i, targets[i]]; probs may alias logits (the model overwrites
// its largest activation in place), so the target logit is read before any write. Logits,
// probs and dlogits are bf16 activations: loaded widened, the max, the sum and the loss in fp32,
// each stored probability or gradient rounded once.
#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

__global__ void crossentropy_forward_kernel(float* losses,        // (N)
                                            act_t* probs,         // (N,V) may alias logits
                                            const act_t* logits,  // (N,V)
                                            const int* targets,   // (N)
                                            int V) {
  const int i = blockIdx.x;
  const act_t* x = logits + static_cast<size_t>(i) * V;  // (V)
  act_t* p = probs + static_cast<size_t>(i) * V;         // (V)
  const float target_logit = act_load(x, targets[i]);
  float max = -INFINITY;
  for (int j = threadIdx.x; j < V; j += blockDim.x) max = fmaxf(max, act_load(x, j));
  max = cuda::block_max(max);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < V; j += blockDim.x) sum += __expf(act_load(x, j) - max);
  sum = cuda::block_sum(sum);  // every thread has read its x[j] before any writes below
  const float inv_sum = 1.0f / sum;
  // Each thread rewrites only the x[j] it has just read (the in-place case).
  for (int j = threadIdx.x; j < V; j += blockDim.x)
    act_store(p, j, __expf(act_load(x, j) - max) * inv_sum);
  // max - target_logit first: the rounding of the sum stays at the loss's magnitude, not
  // max's (a confident prediction has a loss near 0 and max far from 0).
  if (threadIdx.x == 0) losses[i] = (max - target_logit) + logf(sum);
}

// dlogits = (probs - onehot(target)) * dloss, written (may alias probs). The target's
// p - 1 is taken as -(sum of the other probabilities): a confident p rounded to bf16 is
// within 2^-9 of 1, which would be most of p - 1 (or all of it), while the sum keeps bf16's
// relative precision.
__global__ void crossentropy_backward_kernel(act_t* dlogits,      // (N,V)
                                             const act_t* probs,  // (N,V)
                                             const int* targets,  // (N)
                                             float dloss, int V) {
  const int i = blockIdx.x;
  const act_t* p = probs + static_cast<size_t>(i) * V;  // (V)
  act_t* d = dlogits + static_cast<size_t>(i) * V;      // (V)
  const int target = targets[i];
  float others = 0.0f;
  for (int j = threadIdx.x; j < V; j += blockDim.x)
    if (j != target) others += act_load(p, j);
  others = cuda::block_sum(others);  // every read of p[target] is done before it is written
  // Each thread rewrites only the p[j] it reads (the in-place case).
  for (int j = threadIdx.x; j < V; j += blockDim.x)
    act_store(d, j, (j == target ? -others : act_load(p, j)) * dloss);
}

}  // namespace

void CudaBackend::crossentropy_forward(float* losses,          // (N)
                                       Act* probs_act,         // (N,V) may alias logits
                                       const Act* logits_act,  // (N,V)
                                       const int* targets,     // (N)
                                       int N, int V) {
  act_t* probs = act_ptr(probs_act);
  const act_t* logits = act_ptr(logits_act);
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
  act_t* dlogits = act_ptr(dlogits_act);
  const act_t* probs = act_ptr(probs_act);
  if (N == 0) return;
  note_write(dlogits);
  crossentropy_backward_kernel<<<N, kThreads>>>(dlogits, probs, targets, dloss, V);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
