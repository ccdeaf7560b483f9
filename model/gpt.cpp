#include "model/gpt.h"

#include <numeric>

#include "core/error.h"

namespace moe {

GptModel::GptModel(Backend& backend, const ModelConfig& config, const ParamLayout& layout,
                   int max_batch, int max_seq, const ModelGroups& groups)
    : backend_(backend), config_(config), layout_(layout), groups_(groups),
      max_batch_(max_batch), max_seq_(max_seq), tp_(groups.tp.size()),
      C_local_(config.hidden_size / tp_), NH_local_(config.num_attention_heads / tp_),
      F_local_(config.ffn_hidden_size / tp_) {
  MOE_CHECK(layout.tp_size() == tp_, "parameter layout and tensor-parallel group disagree");
  const size_t BT = static_cast<size_t>(max_batch) * max_seq, C = config.hidden_size,
               V = config.vocab_size, CL = C_local_, F = F_local_, NH = NH_local_;
  params_ = Buffer<float>(backend, layout.total_floats());
  grads_ = Buffer<float>(backend, layout.total_floats());
  p_ = layout_.bind(params_.data());
  g_ = layout_.bind(grads_.data());

  inputs_BT_ = Buffer<int>(backend, BT);
  targets_BT_ = Buffer<int>(backend, BT);
  encoded_ = ActBuffer(backend, BT * C);
  for (int l = 0; l < config.num_layers; ++l) {
    const bool dense = !config.is_switch_layer(l);
    LayerActivations a;
    a.ln1 = ActBuffer(backend, BT * C);
    a.ln1_mean = Buffer<float>(backend, BT);
    a.ln1_rstd = Buffer<float>(backend, BT);
    a.qkv = ActBuffer(backend, BT * 3 * CL);
    a.att_lse = Buffer<float>(backend, static_cast<size_t>(max_batch) * NH * max_seq);
    a.atty = ActBuffer(backend, BT * CL);
    a.attproj = ActBuffer(backend, BT * C);
    a.res2 = ActBuffer(backend, BT * C);
    a.ln2 = ActBuffer(backend, BT * C);
    a.ln2_mean = Buffer<float>(backend, BT);
    a.ln2_rstd = Buffer<float>(backend, BT);
    if (dense) {
      a.fch = ActBuffer(backend, BT * F);
      a.fch_gelu = ActBuffer(backend, BT * F);
    }
    a.ffn_out = ActBuffer(backend, BT * C);
    a.res3 = ActBuffer(backend, BT * C);
    layers_.push_back(std::move(a));
    switch_index_of_layer_.push_back(dense ? -1 : static_cast<int>(switch_layer_ids_.size()));
    if (!dense) switch_layer_ids_.push_back(l);
  }
  switch_layers_.reserve(switch_layer_ids_.size());
  for (int l : switch_layer_ids_) {
    SwitchShape shape{static_cast<int>(BT), config.hidden_size, config.ffn_hidden_size,
                      config.num_experts, config.moe_router_topk, l};
    switch_layers_.emplace_back(backend, shape, SwitchGroups{groups.tp, groups.ep, groups.stats},
                                phase_times_);
  }
  lnf_ = ActBuffer(backend, BT * C);
  lnf_mean_ = Buffer<float>(backend, BT);
  lnf_rstd_ = Buffer<float>(backend, BT);
  logits_BTV_ = ActBuffer(backend, BT * V);
  losses_BT_ = Buffer<float>(backend, BT);
  dres_ = ActBuffer(backend, BT * C);
  dln_ = ActBuffer(backend, BT * C);
  datty_ = ActBuffer(backend, BT * CL);
  dqkv_ = ActBuffer(backend, BT * 3 * CL);
  dfch_ = ActBuffer(backend, BT * F);
}

SwitchWeights GptModel::switch_weights(int layer) const {
  const BlockTensors& b = p_.blocks[layer];
  return {b.router_w, b.experts_fc_w, b.experts_fc_b, b.experts_proj_w, b.experts_proj_b};
}

SwitchGrads GptModel::switch_grads(int layer) const {
  const BlockTensors& b = g_.blocks[layer];
  return {b.router_w, b.experts_fc_w, b.experts_fc_b, b.experts_proj_w, b.experts_proj_b};
}

ForwardLosses GptModel::forward(const int* inputs_host, const int* targets_host, int B, int T,
                                const RoutingOptions& routing) {
  MOE_CHECK(B <= max_batch_ && T <= max_seq_, "micro-batch larger than the model was sized for");
  B_ = B;
  T_ = T;
  const int N = B * T, C = config_.hidden_size, V = config_.vocab_size, CL = C_local_,
            F = F_local_, NH = NH_local_;
  // Row-parallel projections add their bias once: on tp rank 0, before the all-reduce.
  const bool adds_bias = groups_.tp.rank() == 0;
  const ActType type = backend_.activation_type();
  backend_.copy_from_host(inputs_BT_.data(), inputs_host, sizeof(int) * N);
  backend_.embedding_forward(encoded_.data(), inputs_BT_.data(), p_.wte, p_.wpe, B, T, C);

  ForwardLosses losses;
  const Act* residual = encoded_.data();  // (B, T, C) the block's input
  for (int l = 0; l < config_.num_layers; ++l) {
    const BlockTensors& w = p_.blocks[l];
    LayerActivations& a = layers_[l];
    // x += attn(ln_1(x))
    backend_.layernorm_forward(a.ln1.data(), a.ln1_mean.data(), a.ln1_rstd.data(), residual,
                               w.ln1_w, w.ln1_b, N, C);
    backend_.linear_forward(a.qkv.data(), a.ln1.data(), w.qkv_w, w.qkv_b, N, C, 3 * CL);
    backend_.attention_forward(a.atty.data(), a.att_lse.data(), a.qkv.data(), B, T, CL, NH);
    backend_.linear_forward(a.attproj.data(), a.atty.data(), w.attn_proj_w,
                            adds_bias ? w.attn_proj_b : nullptr, N, CL, C);
    if (tp_ > 1) groups_.tp.allreduce_sum(a.attproj.data(), static_cast<size_t>(N) * C, type);
    backend_.add(a.res2.data(), residual, a.attproj.data(), static_cast<size_t>(N) * C);
    // x += ffn(ln_2(x))
    backend_.layernorm_forward(a.ln2.data(), a.ln2_mean.data(), a.ln2_rstd.data(),
                               a.res2.data(), w.ln2_w, w.ln2_b, N, C);
    const int s = switch_index_of_layer_[l];
    if (s < 0) {
      backend_.linear_gelu_forward(a.fch.data(), a.fch_gelu.data(), a.ln2.data(), w.fc_w,
                                   w.fc_b, N, C, F);
      backend_.linear_forward(a.ffn_out.data(), a.fch_gelu.data(), w.proj_w,
                              adds_bias ? w.proj_b : nullptr, N, F, C);
      if (tp_ > 1) groups_.tp.allreduce_sum(a.ffn_out.data(), static_cast<size_t>(N) * C, type);
    } else {
      SwitchLayer& moe = switch_layers_[s];
      moe.forward(a.ffn_out.data(), a.ln2.data(), switch_weights(l), N, routing);
      losses.load_balancing_loss += moe.stats().load_balancing_loss(config_.moe_router_topk);
      losses.z_loss += moe.stats().z_loss();
    }
    backend_.add(a.res3.data(), a.res2.data(), a.ffn_out.data(), static_cast<size_t>(N) * C);
    residual = a.res3.data();
  }
  backend_.layernorm_forward(lnf_.data(), lnf_mean_.data(), lnf_rstd_.data(), residual, p_.lnf_w,
                             p_.lnf_b, N, C);
  // Tied output embedding: logits = ln_f(x) @ wte^T.
  backend_.linear_forward(logits_BTV_.data(), lnf_.data(), p_.wte, nullptr, N, C, V);
  if (targets_host == nullptr) return losses;

  backend_.copy_from_host(targets_BT_.data(), targets_host, sizeof(int) * N);
  backend_.crossentropy_forward(losses_BT_.data(), logits_BTV_.data(), logits_BTV_.data(),
                                targets_BT_.data(), N, V);
  std::vector<float> token_losses(N);
  backend_.copy_to_host(token_losses.data(), losses_BT_.data(), sizeof(float) * N);
  double sum = 0.0;
  for (float x : token_losses) sum += x;
  losses.lm_loss = sum / N;
  return losses;
}

void GptModel::backward(const LossScales& scales,
                        const std::function<void(int layer)>& layer_done) {
  const int B = B_, T = T_, N = B * T, C = config_.hidden_size, V = config_.vocab_size,
            CL = C_local_, F = F_local_, NH = NH_local_;
  const size_t NC = static_cast<size_t>(N) * C;
  const ActType type = backend_.activation_type();
  // lm_loss is a mean over the micro-batch's tokens.
  backend_.crossentropy_backward(logits_BTV_.data(), logits_BTV_.data(), targets_BT_.data(),
                                 scales.lm / N, N, V);
  dln_.zero();
  backend_.linear_backward(dln_.data(), g_.wte, nullptr, logits_BTV_.data(), lnf_.data(), p_.wte,
                           N, C, V);
  const Act* last = config_.num_layers > 0 ? layers_.back().res3.data() : encoded_.data();
  dres_.zero();
  backend_.layernorm_backward(dres_.data(), g_.lnf_w, g_.lnf_b, dln_.data(), last, p_.lnf_w,
                              lnf_mean_.data(), lnf_rstd_.data(), N, C);

  for (int l = config_.num_layers - 1; l >= 0; --l) {
    const BlockTensors& w = p_.blocks[l];
    const BlockTensors& g = g_.blocks[l];
    LayerActivations& a = layers_[l];
    const Act* residual = l == 0 ? encoded_.data() : layers_[l - 1].res3.data();
    // dres holds d(res3); res3 = res2 + ffn(ln_2(res2)).
    dln_.zero();
    const int s = switch_index_of_layer_[l];
    if (s < 0) {
      backend_.gelu_linear_backward(dfch_.data(), g.proj_w, g.proj_b, dres_.data(),
                                    a.fch_gelu.data(), w.proj_w, a.fch.data(), N, F, C);
      backend_.linear_backward(dln_.data(), g.fc_w, g.fc_b, dfch_.data(), a.ln2.data(), w.fc_w,
                               N, C, F);
      if (tp_ > 1) groups_.tp.allreduce_sum(dln_.data(), NC, type);  // each rank saw F' of F
    } else {
      switch_layers_[s].backward(dln_.data(), switch_grads(l), dres_.data(), a.ln2.data(),
                                 switch_weights(l), scales.aux, scales.z);
    }
    backend_.layernorm_backward(dres_.data(), g.ln2_w, g.ln2_b, dln_.data(), a.res2.data(),
                                w.ln2_w, a.ln2_mean.data(), a.ln2_rstd.data(), N, C);
    // dres holds d(res2); res2 = res1 + attn(ln_1(res1)).
    datty_.zero();
    backend_.linear_backward(datty_.data(), g.attn_proj_w, g.attn_proj_b, dres_.data(),
                             a.atty.data(), w.attn_proj_w, N, CL, C);
    dqkv_.zero();
    backend_.attention_backward(dqkv_.data(), datty_.data(), a.atty.data(), a.qkv.data(),
                                a.att_lse.data(), B, T, CL, NH);
    dln_.zero();
    backend_.linear_backward(dln_.data(), g.qkv_w, g.qkv_b, dqkv_.data(), a.ln1.data(), w.qkv_w,
                             N, C, 3 * CL);
    if (tp_ > 1) groups_.tp.allreduce_sum(dln_.data(), NC, type);  // each saw NH' of NH heads
    backend_.layernorm_backward(dres_.data(), g.ln1_w, g.ln1_b, dln_.data(), residual, w.ln1_w,
                                a.ln1_mean.data(), a.ln1_rstd.data(), N, C);
    if (layer_done) layer_done(l);
  }
  backend_.embedding_backward(g_.wte, g_.wpe, dres_.data(), inputs_BT_.data(), B, T, C);
}

}  // namespace moe
