"""transformers internals tpcli uses, behind one module: written against transformers 5.23 (`versions.ADAPTERS`).

Two kinds of entries:

* `INTERNALS`: classes and functions transformers defines but does not export from the package (or names with a
  leading `_`), imported lazily by name: `from tpcli.adapters.transformers_api import WeightRenaming` imports
  `transformers.core_model_loading` at that moment, not when this module is imported.
* functions below: private attributes and methods of transformers objects (`model._resolve_parallel_plans`,
  `AutoModel._model_mapping`, `config._attn_implementation`, ...) and the one monkey-patch tpcli applies.

Every entry says which internal it wraps; all were checked against 5.23.0 (the oldest tested release) and 5.24.
When transformers moves one, the ImportError/AttributeError is raised from here and `versions.moved_internal`
turns it into one line naming the installed and the tested versions.
"""

from __future__ import annotations

import contextlib
import importlib

from tpcli.adapters import lazy_internals

# name -> (module, attribute, what tpcli uses it for). All present in transformers 5.23.0.
INTERNALS: dict[str, tuple[str, str, str]] = {
    # weight conversions (checkpoint names <-> run-time names), tpcli.planning.convert
    "get_model_conversion_mapping": ("transformers.conversion_mapping", "get_model_conversion_mapping",
                                     "the renamings/converters from_pretrained applies to one model"),
    "PrefixChange": ("transformers.core_model_loading", "PrefixChange", "a base-model prefix rename"),
    "WeightRenaming": ("transformers.core_model_loading", "WeightRenaming", "a key rename"),
    "WeightConverter": ("transformers.core_model_loading", "WeightConverter",
                        "a many-to-one tensor conversion (also exported as transformers.WeightConverter)"),
    "apply_converters": ("transformers.core_model_loading", "apply_converters", "match a name to a converter"),
    "dot_natural_key": ("transformers.core_model_loading", "dot_natural_key", "from_pretrained's key order"),
    "rename_source_key": ("transformers.core_model_loading", "rename_source_key", "checkpoint key -> run-time name"),
    "revert_weight_conversion": ("transformers.core_model_loading", "revert_weight_conversion",
                                 "run-time tensors -> checkpoint tensors (save_pretrained's way back)"),
    # TP styles and plans, tpcli.planning.style_classes / checks / plan, commands.inspect
    "replace_layer_number_by_wildcard": ("transformers.distributed.parallel_utils",
                                         "replace_layer_number_by_wildcard", "'layers.3.x' -> 'layers.*.x'"),
    "ALL_PARALLEL_STYLES": ("transformers.distributed.parallel_utils", "ALL_PARALLEL_STYLES",
                            "the style registry tpcli adds its own styles to"),
    "AllReduceBackward": ("transformers.distributed.parallel_utils", "_AllReduceBackward",
                          "identity forward, all-reduce of the gradient"),
    "AllReduceForward": ("transformers.distributed.parallel_utils", "_AllReduceForward",
                         "all-reduce forward, identity backward"),
    "use_local_dtensor_params": ("transformers.distributed.parallel_utils", "_use_local_dtensor_params",
                                 "context: a module's DTensor parameters seen as local tensors"),
    "TensorParallelLayer": ("transformers.distributed.tensor_parallel", "TensorParallelLayer",
                            "base class of a TP style"),
    "MoeExpertsParallel": ("transformers.distributed.tensor_parallel", "MoeExpertsParallel",
                           "the moe_tp_experts style"),
    "PipelineIdentityLayer": ("transformers.distributed.pipeline_parallel", "PipelineIdentityLayer",
                              "what a pipeline stage puts in place of a layer it does not own"),
    # distributed checkpoints, tpcli.runtime.state
    "save_optimizer_distributed": ("transformers.distributed.checkpoint", "save_optimizer_distributed",
                                   "the optimizer's DCP save (exported from transformers.distributed only)"),
    "load_model_checkpoint_distributed": ("transformers.distributed.checkpoint", "_load_model_checkpoint_distributed",
                                          "load a DCP model folder into a TP/mesh model"),
    "redistribute_state_dict": ("transformers.distributed.checkpoint", "_redistribute_state_dict",
                                "DTensors of a state dict re-placed for (or back from) a DCP save"),
    # quantization, tpcli.planning.quant and tpcli.testing
    "AutoHfQuantizer": ("transformers.quantizers.auto", "AutoHfQuantizer", "the quantizer for a config"),
    "Fp8Dequantize": ("transformers.integrations.finegrained_fp8", "Fp8Dequantize", "block-scaled FP8 -> float"),
    "Fp8Quantize": ("transformers.integrations.finegrained_fp8", "Fp8Quantize", "float -> block-scaled FP8"),
    # loading and memory, tpcli.runtime.fast_load and tpcli.planning.memory
    "ContextManagers": ("transformers.utils.generic", "ContextManagers", "enter a list of contexts (init context)"),
    "get_layer_types_and_kwargs": ("transformers.cache_utils", "get_layer_types_and_kwargs",
                                   "the KV-cache layer kinds a config builds"),
}

# Private methods and attributes of transformers classes the functions below use: (owner, attribute), checked to
# exist by tests/test_adapters.py (run by `make test-newest` against the newest tested release too).
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("transformers.PreTrainedModel", "_resolve_parallel_plans"),
    ("transformers.PreTrainedModel", "_from_config"),
    ("transformers.PreTrainedModel", "_move_missing_keys_from_meta_to_device"),
    ("transformers.AutoModel", "_model_mapping"),
    ("transformers.AutoModelForCausalLM", "_model_mapping"),
    ("transformers.integrations.finegrained_fp8.Fp8Dequantize", "_dequantize_one"),
    ("transformers.integrations.finegrained_fp8.Fp8Quantize", "_quantize_one"),
    ("transformers.distributed.mixin", "apply_tensor_parallelism"),
)

# The logger transformers' plan resolution warns on (rules that match nothing; tpcli reports those itself).
PLAN_LOGGER = "transformers.distributed.mixin"


__getattr__ = lazy_internals(__name__, INTERNALS)


def modeling_class(model_type: str, name: str):
    """A class of `transformers.models.<model_type>.modeling_<model_type>` (e.g. ("bloom", "BloomAttention")):
    the attention classes tpcli's per-model adaptations patch (tpcli.runtime.adaptations)."""
    return getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), name)


def auto_model_class(auto, config):
    """The model class an Auto class maps `config`'s type to, or None (`auto._model_mapping`)."""
    mapping = auto._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


def from_config(cls, config, **kwargs):
    """`cls._from_config(config, **kwargs)`: a model built from a config without the Auto classes' checks (what
    `AutoModel.from_config` calls; with torch.device("meta") it allocates nothing)."""
    return cls._from_config(config, **kwargs)


def resolve_parallel_plans(model, distributed_config) -> tuple:
    """(tp, ep, fsdp) plans expanded per module and parameter, exactly as `from_pretrained(distributed_config=...)`
    applies them (`PreTrainedModel._resolve_parallel_plans`, transformers.distributed.mixin). Raises ValueError
    on an unknown key or style; transformers' warnings about rules matching nothing are silenced."""
    import logging

    logger = logging.getLogger(PLAN_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return model._resolve_parallel_plans(distributed_config)
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def filtered_tensor_parallelism(filter_plan):
    """While active, `from_pretrained` applies `filter_plan(model, tp_plan)` instead of `tp_plan`.

    Patches `transformers.distributed.mixin.apply_tensor_parallelism(model, tp_mesh, tp_plan)`, the name
    `maybe_distribute_model` calls (module-level function, not exported). Not thread-safe; undone on exit."""
    mixin = importlib.import_module("transformers.distributed.mixin")
    original = mixin.apply_tensor_parallelism

    def apply_filtered(model, tp_mesh, tp_plan):
        return original(model, tp_mesh, filter_plan(model, tp_plan))

    mixin.apply_tensor_parallelism = apply_filtered
    try:
        yield
    finally:
        mixin.apply_tensor_parallelism = original


def weight_conversions(model):
    """The conversions `revert_weight_conversion` reverts (`model._weight_conversions`; None when unset)."""
    return getattr(model, "_weight_conversions", None)


def set_weight_conversions(model, conversions) -> None:
    """Attach the conversions from_pretrained would have attached (`model._weight_conversions`)."""
    model._weight_conversions = conversions


def experts_implementation(config) -> str | None:
    """What transformers picked for a config's MoE experts (`config._experts_implementation`), None if unset."""
    return getattr(config, "_experts_implementation", None)


def attn_implementation(config, default: str | None = "sdpa") -> str | None:
    """The attention kernel a config selects (`config._attn_implementation`), `default` if unset."""
    return getattr(config, "_attn_implementation", default)


def device_mesh(model):
    """The TP device mesh transformers attached to a loaded model (`model._device_mesh`), or None."""
    return getattr(model, "_device_mesh", None)


def mesh_manager_meshes(model) -> tuple | None:
    """(dense mesh, expert mesh) of a model loaded on a mesh (`model._mesh_manager._dense_mesh/_expert_mesh`),
    None when transformers attached no mesh manager."""
    manager = getattr(model, "_mesh_manager", None)
    return None if manager is None else (manager._dense_mesh, manager._expert_mesh)


def move_missing_keys_from_meta_to_device(model, keys, device_map, device_mesh, hf_quantizer) -> None:
    """from_pretrained's step that materialises the meta tensors of `keys` on their devices (as DTensors on
    `device_mesh`) (`PreTrainedModel._move_missing_keys_from_meta_to_device`)."""
    model._move_missing_keys_from_meta_to_device(keys, device_map, device_mesh, hf_quantizer)


def mark_initialized(tensor) -> None:
    """Tell `initialize_weights` a tensor holds loaded values (`tensor._is_hf_initialized = True`)."""
    tensor._is_hf_initialized = True


def fp8_dequantize(weight, scales, dtype):
    """`Fp8Dequantize(None)._dequantize_one`: fp8 (..., N, K) x float32 scales (..., N/bm, K/bn) -> dtype."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scales, output_dtype=dtype)


def fp8_quantize(op, key: str, tensor) -> dict:
    """`Fp8Quantize._quantize_one(key, tensor)`: {weight name: fp8 tensor, scale name: float32 scales}."""
    return op._quantize_one(key, tensor)
