// The GPT-2-style decoder with Switch layers (DESIGN.md, Model): forward and backward of one
// micro-batch through the backend interface. Parameters and gradients are two flat fp32 buffers
// with one ParamLayout; activations, in the backend's activation type, are sized once for the
// largest micro-batch.
//
// Tensor parallelism follows Megatron: c_attn and c_fc are split by output rows (attention by
// heads), the projections after them by input columns, with one all-reduce over tp after each
// projection in forward and one after each split input layer in backward. LayerNorms,
// embeddings and the tied logits are replicated. C' = C/tp, NH' = NH/tp, F' = F/tp.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "core/phase_times.h"
#include "dist/communicator.h"
#include "experts/switch_layer.h"
#include "model/config.h"
#include "model/parameters.h"

namespace moe {

// What one micro-batch's forward measured.
struct ForwardLosses {
  double lm_loss = 0;              // mean cross-entropy over the micro-batch's targets
  double load_balancing_loss = 0;  // summed over Switch layers, before the coefficient
  double z_loss = 0;               // summed over Switch layers, before the coefficient
};

// d(total loss)/d(each loss) for this micro-step: 1/num_micro times each coefficient.
struct LossScales {
  float lm = 1.0f;
  float aux = 0.0f;
  float z = 0.0f;
};

// The process groups the model talks to; all self communicators on one rank.
struct ModelGroups {
  Communicator& tp;     // tensor-parallel partners (same tokens, different shards)
  Communicator& ep;     // expert-parallel partners (token exchange)
  Communicator& stats;  // every rank of a micro-step (routing statistics)
};

class GptModel {
 public:
  GptModel(Backend& backend, const ModelConfig& config, const ParamLayout& layout,
           int max_batch, int max_seq, const ModelGroups& groups);

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  float* params() { return params_.data(); }  // (layout.total_floats())
  float* grads() { return grads_.data(); }    // (layout.total_floats())
  void zero_grads() { grads_.zero(); }

  // Forward of one micro-batch of B windows of T tokens. With targets, returns the losses and
  // leaves softmax probabilities for backward; without (targets_host == nullptr), leaves the
  // logits readable through logits().
  ForwardLosses forward(const int* inputs_host,   // (B, T)
                        const int* targets_host,  // (B, T) or nullptr
                        int B, int T, const RoutingOptions& routing);
  // Accumulates the gradients of the last forward (which must have had targets). When given,
  // layer_done(l) runs as soon as block l's gradients are final, so that their reduction can
  // start while the rest of backward runs.
  void backward(const LossScales& scales, const std::function<void(int layer)>& layer_done = {});

  const Act* logits() const { return logits_BTV_.data(); }  // (B, T, V)
  // Wall time per phase of the Switch layers since the last reset.
  PhaseTimes& phase_times() { return phase_times_; }
  // The Switch layers in model order (index i is the i-th Switch layer).
  std::vector<SwitchLayer>& switch_layers() { return switch_layers_; }
  const std::vector<int>& switch_layer_ids() const { return switch_layer_ids_; }

 private:
  struct LayerActivations {
    ActBuffer ln1;           // (B, T, C)
    Buffer<float> ln1_mean;  // (B, T)
    Buffer<float> ln1_rstd;  // (B, T)
    ActBuffer qkv;           // (B, T, 3C')
    Buffer<float> att_lse;   // (B, NH', T) logsumexp of each attention row's scores
    ActBuffer atty;          // (B, T, C')
    ActBuffer attproj;       // (B, T, C)
    ActBuffer res2;          // (B, T, C) residual after attention
    ActBuffer ln2;           // (B, T, C)
    Buffer<float> ln2_mean;  // (B, T)
    Buffer<float> ln2_rstd;  // (B, T)
    ActBuffer fch;           // (B, T, F') dense layers only
    ActBuffer fch_gelu;      // (B, T, F') dense layers only
    ActBuffer ffn_out;       // (B, T, C)
    ActBuffer res3;          // (B, T, C) the block's output
  };
  SwitchWeights switch_weights(int layer) const;
  SwitchGrads switch_grads(int layer) const;

  Backend& backend_;
  ModelConfig config_;
  ParamLayout layout_;
  ModelGroups groups_;
  int max_batch_, max_seq_;
  int tp_;                 // tensor-parallel size
  int C_local_, NH_local_, F_local_;  // C', NH', F'
  int B_ = 0, T_ = 0;  // shape of the last forward

  Buffer<float> params_;
  Buffer<float> grads_;
  ModelTensors p_;  // views into params_
  ModelTensors g_;  // views into grads_

  Buffer<int> inputs_BT_;     // (B, T)
  Buffer<int> targets_BT_;    // (B, T)
  ActBuffer encoded_;         // (B, T, C)
  std::vector<LayerActivations> layers_;
  PhaseTimes phase_times_;
  std::vector<SwitchLayer> switch_layers_;
  std::vector<int> switch_index_of_layer_;  // (L) index into switch_layers_, -1 if dense
  std::vector<int> switch_layer_ids_;       // model layer of each Switch layer
  ActBuffer lnf_;             // (B, T, C)
  Buffer<float> lnf_mean_;    // (B, T)
  Buffer<float> lnf_rstd_;    // (B, T)
  ActBuffer logits_BTV_;      // (B, T, V) logits, then softmax probs, then dlogits
  Buffer<float> losses_BT_;   // (B, T)

  // backward scratch
  ActBuffer dres_;            // (B, T, C) gradient of the residual stream
  ActBuffer dln_;             // (B, T, C)
  ActBuffer datty_;           // (B, T, C')
  ActBuffer dqkv_;            // (B, T, 3C')
  ActBuffer dfch_;            // (B, T, F') d(fch), written by gelu_linear_backward
};

}  // namespace moe
