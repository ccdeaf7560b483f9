// TEMPORARY: placeholders for ops not yet written; each is removed as its op file lands.
#include "core/cpu/cpu_backend.h"
#include "core/error.h"
namespace moe {
void CpuBackend::grouped_linear_forward(float* out, const float* inp, const float* weight, const float* bias, const int* offsets_host, int E, int IC, int OC) { throw RuntimeError("grouped_linear_forward not written yet"); }
void CpuBackend::grouped_linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp, const float* weight, const int* offsets_host, int E, int IC, int OC) { throw RuntimeError("grouped_linear_backward not written yet"); }
void CpuBackend::softmax_forward(float* probs, float* lse, const float* logits, int N, int E) { throw RuntimeError("softmax_forward not written yet"); }
void CpuBackend::softmax_backward(float* dlogits, const float* dprobs, const float* probs, int N, int E) { throw RuntimeError("softmax_backward not written yet"); }
void CpuBackend::topk_forward(int* expert_idx, float* gates, const float* probs, int N, int E, int K) { throw RuntimeError("topk_forward not written yet"); }
void CpuBackend::topk_backward(float* dprobs, const float* dgates, const int* expert_idx, const float* probs, int N, int E, int K) { throw RuntimeError("topk_backward not written yet"); }
void CpuBackend::capacity_assign(int* slot_host, int* counts_host, int* choices_host, const int* expert_idx, const float* gates, int N, int E, int K, int capacity, DropPolicy policy) { throw RuntimeError("capacity_assign not written yet"); }
void CpuBackend::column_sums(double* sums_host, const float* x, int N, int E) { throw RuntimeError("column_sums not written yet"); }
void CpuBackend::add_row_vector(float* x, const float* v_host, int N, int E) { throw RuntimeError("add_row_vector not written yet"); }
void CpuBackend::zloss_backward(float* dlogits, const float* probs, const float* lse, float scale, int N, int E) { throw RuntimeError("zloss_backward not written yet"); }
void CpuBackend::gather_rows(float* out, const float* inp, const int* row_idx_host, int rows, int D) { throw RuntimeError("gather_rows not written yet"); }
void CpuBackend::scatter_add_rows(float* dinp, const float* dout, const int* row_idx_host, int rows, int D) { throw RuntimeError("scatter_add_rows not written yet"); }
void CpuBackend::combine_forward(float* out, const float* y, const float* gates, const int* row_host, int N, int K, int D) { throw RuntimeError("combine_forward not written yet"); }
void CpuBackend::combine_backward(float* dy, float* dgates, const float* dout, const float* y, const float* gates, const int* row_host, int N, int K, int D) { throw RuntimeError("combine_backward not written yet"); }
}  // namespace moe
