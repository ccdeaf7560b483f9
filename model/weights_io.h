// The model's weights as one safetensors file (DESIGN.md, Formats): DESIGN.md's names,
// [out, in] weights like torch.nn.Linear, the config in __metadata__.
#pragma once

#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/parallel_dims.h"
#include "model/config.h"
#include "model/parameters.h"

namespace moe {

// Writes every tensor of `layout` from `host_params` (layout.total_floats()).
void export_safetensors(const std::string& path, const ModelConfig& config,
                        const ParamLayout& layout, const float* host_params);

// From any parallel layout: every rank sends the tensors it holds the canonical copy of
// (holds_canonical_copy) to world rank 0, which assembles the unsharded tensors and writes one
// file. Collective over `world`.
void export_safetensors_gathered(const std::string& path, const ModelConfig& config,
                                 const ParamLayout& layout, const float* host_params,
                                 const ParallelDims& dims, Communicator& world);

// Reads the config stored in a safetensors file's __metadata__.
ModelConfig read_safetensors_config(const std::string& path);

// Fills `host_params` from the file; RuntimeError naming the file and the tensor when one is
// missing or its shape differs from the layout's (a file made for another model).
void import_safetensors(const std::string& path, const ParamLayout& layout, float* host_params);

}  // namespace moe
