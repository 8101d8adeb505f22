"""Extra TP styles tpcli registers in transformers' `ALL_PARALLEL_STYLES` (their placements: `tpcli.planning.placements`).

transformers' `colwise`/`rowwise` assume `nn.Linear` (weight `[out, in]`). GPT-2-style `Conv1D` stores the weight
transposed, `[in, out]`, and computes `y = addmm(b, x, W)` then `view(..., self.nf)` with the global width, so:

    conv1d_colwise       W = [W_1 ... W_p] along dim 1, b split;  y_r = x W_r + b_r      (output stays sharded)
    conv1d_qkv_colwise   W = [Q | K | V] along dim 1: _StridedShard(1, sf=3), rank r holds [Q_r | K_r | V_r]
    conv1d_rowwise       W split along dim 0, b replicated;       y = sum_r x_r W_r + b  (all-reduce, b once)
    qkv_colwise          nn.Linear packing [Q; K; V] along dim 0: _StridedShard(0, sf=3), output stays sharded
    moe_tp_experts_biased  transformers' moe_tp_experts (local experts, outputs all-reduced) for experts whose
                         output carries a bias: out = sum_e w_e (h_e D_e + c_e); each rank holds a slice of D_e's
                         rows, so ranks > 0 run with c_e = 0 and the all-reduce adds it exactly once. Forward
                         only: in training, ranks > 0 get no gradient for c_e (checked: Conv1D styles' gradients
                         match the single-process model, this one's do not)

Registration happens in every process that loads a model through tpcli (`tpcli.load_model`), before
`from_pretrained`; plain `from_pretrained(tp_plan=...)` in a process that never imported tpcli does not know them.
"""

from __future__ import annotations

import contextlib

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from tpcli.adapters.transformers_api import ALL_PARALLEL_STYLES

    for name, style in _styles().items():
        ALL_PARALLEL_STYLES.register(name, style)
    _REGISTERED = True


def _styles() -> dict:
    import torch
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    from tpcli.adapters.torch_api import module_parameters
    from tpcli.adapters.transformers_api import (
        AllReduceBackward,
        AllReduceForward,
        MoeExpertsParallel,
        TensorParallelLayer,
        use_local_dtensor_params,
    )
    from tpcli.planning.placements import param_placement

    def _group(mesh):
        return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")

    class PlacedStyle(TensorParallelLayer):
        """Parameters placed by `tpcli.planning.placements.param_placement` (one table for loading, shard and gather)."""

        name = ""

        def should_use_local_tensors(self, module):
            return True

        def shard_param(self, module, param, mesh):
            meta = module_parameters(module).get(param)
            if meta is None:
                return
            placement = param_placement(self.name, param, meta.ndim).to_torch()
            module_parameters(module)[param] = torch.nn.Parameter(
                distribute_tensor(meta, mesh, [placement], src_data_rank=None), requires_grad=meta.requires_grad)

    class Colwise(PlacedStyle):
        """Replicated input, local matmul, output sharded on the last dim (the next layer's heads or features)."""

        def transform_inputs_pre_forward(self, module, args, kwargs, mesh):
            x = args[0]
            if isinstance(x, DTensor):
                x = x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
            else:  # replicated input, partial input-gradient: summed over ranks in backward (identity forward)
                x = AllReduceBackward.apply(x, _group(mesh))
            return (x,) + args[1:], kwargs

        @contextlib.contextmanager
        def context_around_forward(self, module, mesh):
            with use_local_dtensor_params(module):
                if hasattr(module, "nf"):  # Conv1D views its output with the global width
                    nf, module.nf = module.nf, module.weight.shape[-1]
                    try:
                        yield
                    finally:
                        module.nf = nf
                else:
                    yield

    class Conv1DRowwise(PlacedStyle):
        """Input sharded on the last dim; partial sums all-reduced, the bias added once afterwards."""

        def transform_inputs_pre_forward(self, module, args, kwargs, mesh):
            x = args[0]
            if isinstance(x, DTensor):
                x = x.to_local()
            return (x,) + args[1:], kwargs

        @contextlib.contextmanager
        def context_around_forward(self, module, mesh):
            with use_local_dtensor_params(module):
                bias = module_parameters(module)["bias"]
                module_parameters(module)["bias"] = torch.zeros_like(bias)  # addmm needs a bias; adding 0 is exact
                try:
                    yield
                finally:
                    module_parameters(module)["bias"] = bias

        def transform_output_post_forward(self, module, output, mesh):
            output = AllReduceForward.apply(output, _group(mesh))  # sum of partials; identity backward
            bias = module_parameters(module)["bias"]
            return output + (bias.to_local() if isinstance(bias, DTensor) else bias)

    class MoeExpertsBiased(MoeExpertsParallel):
        @contextlib.contextmanager
        def context_around_forward(self, module, mesh):
            with use_local_dtensor_params(module):
                bias = module_parameters(module).get("down_proj_bias")
                if bias is None or mesh.get_local_rank() == 0:
                    yield
                    return
                module_parameters(module)["down_proj_bias"] = torch.zeros_like(bias)
                try:
                    yield
                finally:
                    module_parameters(module)["down_proj_bias"] = bias

    out = {"moe_tp_experts_biased": MoeExpertsBiased()}
    for name, cls in (("conv1d_colwise", Colwise), ("conv1d_qkv_colwise", Colwise), ("qkv_colwise", Colwise),
                      ("conv1d_rowwise", Conv1DRowwise)):
        style = cls()
        style.name = name
        out[name] = style
    return out
