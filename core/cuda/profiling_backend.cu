// MOE_CUDA_PROFILE=1: a Backend that wraps the CUDA backend and times every op of the interface
// on the GPU (a CUDA event before and after each call, on the legacy default stream every op
// runs on), then prints one table to stderr when the backend is destroyed: calls, GPU
// milliseconds and share per op, and how much of the wall time since the backend was created
// the GPU spent inside ops at all (the rest is launch gaps, host round trips and work outside
// the backend, e.g. NCCL). For the first GPU runs, where no profiler may be installed.
// Without the variable make_cuda_backend returns the plain backend: nothing here runs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/profiling_backend.h"

namespace moe {
namespace {

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(std::unique_ptr<Backend> inner)
      : inner_(std::move(inner)), created_(std::chrono::steady_clock::now()) {}
  ~ProfilingBackend() override;

  std::string name() const override {
    return inner_->name();
  }
  void* alloc_bytes(size_t bytes) override {
    return inner_->alloc_bytes(bytes);
  }
  void free_bytes(void* ptr) override {
    inner_->free_bytes(ptr);
  }
  void copy_to_host(void* dst_host, const void* src, size_t bytes) override {
    const OpTimer timer(*this, "copy_to_host");
    inner_->copy_to_host(dst_host, src, bytes);
  }
  void copy_from_host(void* dst, const void* src_host, size_t bytes) override {
    const OpTimer timer(*this, "copy_from_host");
    inner_->copy_from_host(dst, src_host, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    const OpTimer timer(*this, "copy");
    inner_->copy(dst, src, bytes);
  }
  void fill_zero(void* ptr, size_t bytes) override {
    const OpTimer timer(*this, "fill_zero");
    inner_->fill_zero(ptr, bytes);
  }
  void synchronize() override {
    const OpTimer timer(*this, "synchronize");
    inner_->synchronize();
  }
  // A property, no GPU work: not timed.
  ActType activation_type() const override {
    return inner_->activation_type();
  }
  void copy_act_to_host(float* dst_host, const Act* src, size_t n) override {
    const OpTimer timer(*this, "copy_act_to_host");
    inner_->copy_act_to_host(dst_host, src, n);
  }
  void copy_act_from_host(Act* dst, const float* src_host, size_t n) override {
    const OpTimer timer(*this, "copy_act_from_host");
    inner_->copy_act_from_host(dst, src_host, n);
  }
  void add(Act* out, const Act* a, const Act* b, size_t n) override {
    const OpTimer timer(*this, "add");
    inner_->add(out, a, b, n);
  }
  void accumulate(Act* dst, const Act* src, size_t n) override {
    const OpTimer timer(*this, "accumulate");
    inner_->accumulate(dst, src, n);
  }
  void scale(float* x, float s, size_t n) override {
    const OpTimer timer(*this, "scale");
    inner_->scale(x, s, n);
  }
  double sum_squares(const float* x, size_t n) override {
    const OpTimer timer(*this, "sum_squares");
    return inner_->sum_squares(x, n);
  }
  bool all_finite(const float* x, size_t n) override {
    const OpTimer timer(*this, "all_finite");
    return inner_->all_finite(x, n);
  }
  void mul(Act* out, const Act* a, const float* factors, size_t n) override {
    const OpTimer timer(*this, "mul");
    inner_->mul(out, a, factors, n);
  }
  void embedding_forward(Act* out, const int* idx, const float* wte, const float* wpe, int B, int T, int C) override {
    const OpTimer timer(*this, "embedding_forward");
    inner_->embedding_forward(out, idx, wte, wpe, B, T, C);
  }
  void embedding_backward(float* dwte, float* dwpe, const Act* dout, const int* idx, int B, int T, int C) override {
    const OpTimer timer(*this, "embedding_backward");
    inner_->embedding_backward(dwte, dwpe, dout, idx, B, T, C);
  }
  void layernorm_forward(Act* out, float* mean, float* rstd, const Act* inp, const float* weight, const float* bias, int N, int C) override {
    const OpTimer timer(*this, "layernorm_forward");
    inner_->layernorm_forward(out, mean, rstd, inp, weight, bias, N, C);
  }
  void layernorm_backward(Act* dinp, float* dweight, float* dbias, const Act* dout, const Act* inp, const float* weight, const float* mean, const float* rstd, int N, int C) override {
    const OpTimer timer(*this, "layernorm_backward");
    inner_->layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C);
  }
  void linear_forward(Act* out, const Act* inp, const float* weight, const float* bias, int N, int IC, int OC) override {
    const OpTimer timer(*this, "linear_forward");
    inner_->linear_forward(out, inp, weight, bias, N, IC, OC);
  }
  void linear_backward(Act* dinp, float* dweight, float* dbias, const Act* dout, const Act* inp, const float* weight, int N, int IC, int OC) override {
    const OpTimer timer(*this, "linear_backward");
    inner_->linear_backward(dinp, dweight, dbias, dout, inp, weight, N, IC, OC);
  }
  void grouped_linear_forward(Act* out, const Act* inp, const float* weight, const float* bias, const int* offsets_host, int E, int IC, int OC) override {
    const OpTimer timer(*this, "grouped_linear_forward");
    inner_->grouped_linear_forward(out, inp, weight, bias, offsets_host, E, IC, OC);
  }
  void grouped_linear_backward(Act* dinp, float* dweight, float* dbias, const Act* dout, const Act* inp, const float* weight, const int* offsets_host, int E, int IC, int OC) override {
    const OpTimer timer(*this, "grouped_linear_backward");
    inner_->grouped_linear_backward(dinp, dweight, dbias, dout, inp, weight, offsets_host, E, IC, OC);
  }
  void linear_gelu_forward(Act* pre, Act* out, const Act* inp, const float* weight, const float* bias, int N, int IC, int OC) override {
    const OpTimer timer(*this, "linear_gelu_forward");
    inner_->linear_gelu_forward(pre, out, inp, weight, bias, N, IC, OC);
  }
  void gelu_linear_backward(Act* dpre, float* dweight, float* dbias, const Act* dout, const Act* act, const float* weight, const Act* pre, int N, int IC, int OC) override {
    const OpTimer timer(*this, "gelu_linear_backward");
    inner_->gelu_linear_backward(dpre, dweight, dbias, dout, act, weight, pre, N, IC, OC);
  }
  void grouped_linear_gelu_forward(Act* pre, Act* out, const Act* inp, const float* weight, const float* bias, const int* offsets_host, int E, int IC, int OC) override {
    const OpTimer timer(*this, "grouped_linear_gelu_forward");
    inner_->grouped_linear_gelu_forward(pre, out, inp, weight, bias, offsets_host, E, IC, OC);
  }
  void gelu_grouped_linear_backward(Act* dpre, float* dweight, float* dbias, const Act* dout, const Act* act, const float* weight, const Act* pre, const int* offsets_host, int E, int IC, int OC) override {
    const OpTimer timer(*this, "gelu_grouped_linear_backward");
    inner_->gelu_grouped_linear_backward(dpre, dweight, dbias, dout, act, weight, pre, offsets_host, E, IC, OC);
  }
  void gelu_forward(Act* out, const Act* inp, size_t n) override {
    const OpTimer timer(*this, "gelu_forward");
    inner_->gelu_forward(out, inp, n);
  }
  void gelu_backward(Act* dinp, const Act* inp, const Act* dout, size_t n) override {
    const OpTimer timer(*this, "gelu_backward");
    inner_->gelu_backward(dinp, inp, dout, n);
  }
  void attention_forward(Act* out, float* lse, const Act* qkv, int B, int T, int C, int NH) override {
    const OpTimer timer(*this, "attention_forward");
    inner_->attention_forward(out, lse, qkv, B, T, C, NH);
  }
  void attention_backward(Act* dqkv, const Act* dout, const Act* out, const Act* qkv, const float* lse, int B, int T, int C, int NH) override {
    const OpTimer timer(*this, "attention_backward");
    inner_->attention_backward(dqkv, dout, out, qkv, lse, B, T, C, NH);
  }
  void crossentropy_forward(float* losses, Act* probs, const Act* logits, const int* targets, int N, int V) override {
    const OpTimer timer(*this, "crossentropy_forward");
    inner_->crossentropy_forward(losses, probs, logits, targets, N, V);
  }
  void crossentropy_backward(Act* dlogits, const Act* probs, const int* targets, float dloss, int N, int V) override {
    const OpTimer timer(*this, "crossentropy_backward");
    inner_->crossentropy_backward(dlogits, probs, targets, dloss, N, V);
  }
  void router_logits_forward(float* logits, const Act* inp, const float* weight, int N, int D, int E) override {
    const OpTimer timer(*this, "router_logits_forward");
    inner_->router_logits_forward(logits, inp, weight, N, D, E);
  }
  void router_logits_backward(Act* dinp, float* dweight, const float* dlogits, const Act* inp, const float* weight, int N, int D, int E) override {
    const OpTimer timer(*this, "router_logits_backward");
    inner_->router_logits_backward(dinp, dweight, dlogits, inp, weight, N, D, E);
  }
  void softmax_forward(float* probs, float* lse, const float* logits, int N, int E) override {
    const OpTimer timer(*this, "softmax_forward");
    inner_->softmax_forward(probs, lse, logits, N, E);
  }
  void softmax_backward(float* dlogits, const float* dprobs, const float* probs, int N, int E) override {
    const OpTimer timer(*this, "softmax_backward");
    inner_->softmax_backward(dlogits, dprobs, probs, N, E);
  }
  void topk_forward(int* expert_idx, float* gates, const float* probs, int N, int E, int K) override {
    const OpTimer timer(*this, "topk_forward");
    inner_->topk_forward(expert_idx, gates, probs, N, E, K);
  }
  void topk_backward(float* dprobs, const float* dgates, const int* expert_idx, const float* probs, int N, int E, int K) override {
    const OpTimer timer(*this, "topk_backward");
    inner_->topk_backward(dprobs, dgates, expert_idx, probs, N, E, K);
  }
  void capacity_assign(int* slot_host, int* counts_host, int* choices_host, const int* expert_idx, const float* gates, int N, int E, int K, int capacity, DropPolicy policy) override {
    const OpTimer timer(*this, "capacity_assign");
    inner_->capacity_assign(slot_host, counts_host, choices_host, expert_idx, gates, N, E, K, capacity, policy);
  }
  void column_sums(double* sums_host, const float* x, int N, int E) override {
    const OpTimer timer(*this, "column_sums");
    inner_->column_sums(sums_host, x, N, E);
  }
  void add_row_vector(float* x, const float* v_host, int N, int E) override {
    const OpTimer timer(*this, "add_row_vector");
    inner_->add_row_vector(x, v_host, N, E);
  }
  void zloss_backward(float* dlogits, const float* probs, const float* lse, float scale, int N, int E) override {
    const OpTimer timer(*this, "zloss_backward");
    inner_->zloss_backward(dlogits, probs, lse, scale, N, E);
  }
  void gather_rows(Act* out, const Act* inp, const int* row_idx_host, int rows, int D) override {
    const OpTimer timer(*this, "gather_rows");
    inner_->gather_rows(out, inp, row_idx_host, rows, D);
  }
  void scatter_add_rows(Act* dinp, const Act* dout, const int* row_idx_host, int rows, int D) override {
    const OpTimer timer(*this, "scatter_add_rows");
    inner_->scatter_add_rows(dinp, dout, row_idx_host, rows, D);
  }
  void combine_forward(Act* out, const Act* y, const float* gates, const int* row_host, int N, int K, int D) override {
    const OpTimer timer(*this, "combine_forward");
    inner_->combine_forward(out, y, gates, row_host, N, K, D);
  }
  void combine_backward(Act* dy, float* dgates, const Act* dout, const Act* y, const float* gates, const int* row_host, int N, int K, int D) override {
    const OpTimer timer(*this, "combine_backward");
    inner_->combine_backward(dy, dgates, dout, y, gates, row_host, N, K, D);
  }
  void adamw_update(float* params, const float* grads, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps, float weight_decay, int step) override {
    const OpTimer timer(*this, "adamw_update");
    inner_->adamw_update(params, grads, m, v, n, lr, beta1, beta2, eps, weight_decay, step);
  }

 private:
  // Records the op's start event now and its stop event when the op returns (or throws).
  class OpTimer {
   public:
    OpTimer(ProfilingBackend& profiler, const char* op) : profiler_(profiler), op_(op) {
      start_ = profiler_.take_event();
      cudaEventRecord(start_, 0);
    }
    ~OpTimer() {
      cudaEvent_t stop = profiler_.take_event();
      cudaEventRecord(stop, 0);
      profiler_.finished(op_, start_, stop);
    }
    OpTimer(const OpTimer&) = delete;
    OpTimer& operator=(const OpTimer&) = delete;

   private:
    ProfilingBackend& profiler_;
    const char* op_;
    cudaEvent_t start_ = nullptr;
  };

  struct Pending {
    const char* op;
    cudaEvent_t start, stop;
  };
  struct Totals {
    long long calls = 0;
    double ms = 0;
  };
  static constexpr size_t kMaxPending = 4096;  // events resolved in batches of this many ops

  cudaEvent_t take_event();
  void finished(const char* op, cudaEvent_t start, cudaEvent_t stop);
  // Waits for the pending ops' stop events and adds their times to the totals.
  void resolve();
  void report();

  std::unique_ptr<Backend> inner_;
  std::chrono::steady_clock::time_point created_;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  std::map<std::string, Totals> totals_;
};

cudaEvent_t ProfilingBackend::take_event() {
  if (!free_events_.empty()) {
    cudaEvent_t event = free_events_.back();
    free_events_.pop_back();
    return event;
  }
  cudaEvent_t event = nullptr;
  cudaEventCreate(&event);
  return event;
}

void ProfilingBackend::finished(const char* op, cudaEvent_t start, cudaEvent_t stop) {
  pending_.push_back({op, start, stop});
  if (pending_.size() >= kMaxPending) resolve();
}

void ProfilingBackend::resolve() {
  if (pending_.empty()) return;
  cudaEventSynchronize(pending_.back().stop);
  for (const Pending& p : pending_) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, p.start, p.stop) == cudaSuccess) {
      Totals& t = totals_[p.op];
      ++t.calls;
      t.ms += ms;
    }
    free_events_.push_back(p.start);
    free_events_.push_back(p.stop);
  }
  pending_.clear();
}

void ProfilingBackend::report() {
  resolve();
  const double wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - created_).count();
  double op_ms = 0;
  long long calls = 0;
  std::vector<std::pair<std::string, Totals>> rows(totals_.begin(), totals_.end());
  for (const auto& [op, t] : rows) {
    op_ms += t.ms;
    calls += t.calls;
  }
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  std::fprintf(stderr,
               "moe: CUDA op profile (MOE_CUDA_PROFILE): %.1f ms of GPU time in %lld op calls, "
               "%.1f ms wall since the backend was created (GPU inside ops %.0f%% of it)\n",
               op_ms, calls, wall_ms, wall_ms > 0 ? 100.0 * op_ms / wall_ms : 0.0);
  std::fprintf(stderr, "moe:   %-26s %9s %11s %7s %10s\n", "op", "calls", "GPU ms", "share",
               "mean us");
  for (const auto& [op, t] : rows)
    std::fprintf(stderr, "moe:   %-26s %9lld %11.2f %6.1f%% %10.1f\n", op.c_str(), t.calls, t.ms,
                 op_ms > 0 ? 100.0 * t.ms / op_ms : 0.0, 1000.0 * t.ms / t.calls);
}

ProfilingBackend::~ProfilingBackend() {
  // No throwing from a destructor; a failed CUDA call here only loses the table.
  report();
  for (const Pending& p : pending_) {
    cudaEventDestroy(p.start);
    cudaEventDestroy(p.stop);
  }
  for (cudaEvent_t event : free_events_) cudaEventDestroy(event);
}

}  // namespace

std::unique_ptr<Backend> profile_if_asked(std::unique_ptr<Backend> backend) {
  const char* value = std::getenv("MOE_CUDA_PROFILE");
  if (value == nullptr || std::string(value).empty() || std::string(value) == "0") return backend;
  return std::make_unique<ProfilingBackend>(std::move(backend));
}

}  // namespace moe
