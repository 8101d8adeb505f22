"""Pre-quantized checkpoints: transformers' own quantizer applied to the meta model, in one of two representations.

A checkpoint whose config.json has a `quantization_config` is loaded by `from_pretrained` through the quantizer
`AutoHfQuantizer.from_config` picks. For block-scaled FP8 (`quant_method: "fp8"`, DeepSeek-V3 / Qwen3-FP8 style),
transformers 5.23 has two representations, and tpcli keeps both:

* **stored** (`dequantize=False`, what a GPU with compute capability >= 8.9 gets): `preprocess_model` swaps every
  `nn.Linear` not in `modules_to_not_convert` (lm_head, ...) for `FP8Linear` (weight float8_e4m3fn (out, in),
  `weight_scale_inv` float32 (ceil(out/bm), ceil(in/bn))) and each MoE `experts` module for `FP8Experts` (fused
  `gate_up_proj` (E, 2I, H) with `gate_up_proj_scale_inv` (E, 2I/bm, H/bn), `down_proj` likewise), and
  `update_parallel_plan` adds the scales to the TP plan with their weight's style. tpcli shards, gathers and
  inspects this representation: the checkpoint's bytes, unchanged.
* **dequantized** (`dequantize=True`, what `validate_environment` forces on a machine without such a GPU): the model
  stays plain (`replace_with_fp8_linear` returns at once), and the weight conversions get `Fp8Dequantize` as their
  first op: W = fp8(W_q) * s per (bm x bn) block, computed in float32 and cast to the parameter's dtype.
  `shard --dtype` and `load_model` on CPU produce this representation, through that same op.

Rank r's scales are exactly the blocks of rank r's weight slice iff every sharded weight dimension is cut at block
boundaries (`block_findings`); then W_r = dequant(W_q,r, s_r) bit for bit, because dequantization is elementwise.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from tpcli.errors import ModelError

SUPPORTED_METHODS = ("fp8",)
# Why a method is refused, where there is more to say than "not supported yet".
REFUSED_BECAUSE = {
    "mxfp4": "transformers swizzles MXFP4 blocks and scales into triton-kernel layouts held outside the state dict "
             "(no run-time tensor to shard the scales by) and gpt-oss's TP plan replicates the experts",
}
# Checkpoint-key suffixes that only exist next to a quantized weight (scales, zero points, packed blocks): such a key is
# never dropped while its weight is kept.
COMPANION_SUFFIXES = ("_scale_inv", "_scale", ".scale", "qscale_weight", "_zero_point", ".zero_point", "qzeros",
                      "_blocks", "_scales", ".scales", "g_idx")


@dataclass(frozen=True)
class Quantization:
    """What a quantized checkpoint declares (config.json `quantization_config`)."""

    method: str
    block_size: tuple[int, int] | None
    config: dict

    def describe(self) -> dict:
        return {"method": self.method, "block_size": list(self.block_size) if self.block_size else None,
                "activation_scheme": self.config.get("activation_scheme"),
                "modules_to_not_convert": self.config.get("modules_to_not_convert")}


def _as_dict(qc) -> dict:
    if qc is None:
        return {}
    if isinstance(qc, dict):
        return dict(qc)
    return qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))


def quantization_of(config) -> Quantization | None:
    """The checkpoint's quantization (None for an ordinary checkpoint), refusing methods tpcli cannot shard."""
    qc = getattr(config, "quantization_config", None)
    if qc is None and hasattr(config, "get_text_config"):
        qc = getattr(config.get_text_config(decoder=True), "quantization_config", None)
    if qc is None:
        return None
    data = _as_dict(qc)
    method = str(getattr(data.get("quant_method"), "value", data.get("quant_method")))
    if method not in SUPPORTED_METHODS:
        why = f": {REFUSED_BECAUSE[method]}" if method in REFUSED_BECAUSE else ""
        raise ModelError(f"config.json: quantization method {method!r} is not supported by tpcli (supported: "
                         f"{', '.join(SUPPORTED_METHODS)}){why}; see docs/formats.md, 'Quantized checkpoints'.")
    if data.get("scale_fmt", "float") != "float" or data.get("expert_dtype", "fp8") != "fp8":
        raise ModelError(f"config.json: fp8 with scale_fmt={data.get('scale_fmt')!r}, expert_dtype="
                         f"{data.get('expert_dtype')!r} is not supported by tpcli (only float32 block scales and fp8 "
                         "experts); see docs/formats.md, 'Quantized checkpoints'.")
    block = data.get("weight_block_size")
    return Quantization(method=method, block_size=tuple(block) if block else None, config=data)


def make_quantizer(config, *, dequantize: bool):
    """transformers' quantizer for the checkpoint's config, in the stored or the dequantized representation."""
    from tpcli.adapters.transformers_api import AutoHfQuantizer

    qc = AutoHfQuantizer.from_config(copy.deepcopy(config.quantization_config), pre_quantized=True)
    qc.quantization_config.dequantize = dequantize
    return qc


def apply_quantizer(model, config, *, dequantize: bool, dtype=None):
    """Run `preprocess_model` on a meta model exactly as `from_pretrained` does (modules swapped, tp_plan updated).

    The quantizer is attached as `model.hf_quantizer` (as from_pretrained leaves it) so that `tpcli.planning.convert` builds
    the weight conversions with it."""
    quantizer = make_quantizer(config, dequantize=dequantize)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None, use_kernels=False)
    model.hf_quantizer = quantizer
    return quantizer


def scale_name(weight_name: str) -> str:
    """The scale tensor of a weight, by transformers' naming (`Fp8Quantize._quantize_one`, `FP8Experts`)."""
    return weight_name[: -len("weight")] + "weight_scale_inv" if weight_name.endswith(".weight") else weight_name + "_scale_inv"


def scale_pairs(tensors: dict) -> dict[str, str]:
    """{weight name: scale name} for every weight of `tensors` (name -> TensorInfo) stored with block scales."""
    return {name: scale_name(name) for name, t in tensors.items()
            if t.dtype.startswith("float8") and scale_name(name) in tensors}


def is_companion_key(key: str) -> bool:
    return key.endswith(COMPANION_SUFFIXES)


def companion_base(key: str) -> str:
    """The weight key a companion key belongs to (`x.weight_scale_inv` -> `x.weight`, `x_blocks` -> `x`)."""
    for suffix in ("weight_scale_inv", "weight_scale", "weight.scale", "qscale_weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)] + "weight"
    for suffix in COMPANION_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + (".weight" if suffix.startswith(".") else "")
    return key


def unplaceable_companions(unexpected: list[str], all_keys: set[str]) -> list[str]:
    """Companion keys the model cannot place although their weight is kept (a silent drop would lose data)."""
    dropped = set(unexpected)
    return [k for k in unexpected if is_companion_key(k)
            and companion_base(k) in all_keys and companion_base(k) not in dropped]


def missing_scales(key_meta: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Scale keys a FP8 checkpoint lacks: every float8 weight is stored with its `weight_scale_inv`."""
    return [scale_name(k) for k, (dtype, _) in key_meta.items()
            if dtype.startswith("float8") and scale_name(k) not in key_meta]


def block_misalignments(weight_shape, scale_shape, dim: int, block: int, runs_w, runs_s) -> str | None:
    """Why rank slices of a weight and its scales do not correspond (None when rank r's scales are exactly the
    blocks of rank r's weight slice): every run [a, b) of `dim` must start on a block boundary and end on one (or at
    the end of the dimension), and the scale runs must be [a/B, ceil(b/B))."""
    size = weight_shape[dim]
    for rank, (w, s) in enumerate(zip(runs_w, runs_s, strict=True)):
        want = tuple((a // block, math.ceil(b / block)) for a, b in w if b > a)
        bad = [(a, b) for a, b in w if b > a and (a % block or (b % block and b != size))]
        if bad or want != tuple(r for r in s if r[1] > r[0]):
            a, b = (bad or list(w) or [(0, 0)])[0]
            return f"rank {rank} would hold [{a}:{b}) of dim {dim} (size {size}), which splits a {block}-wide block"
    return None


def dequantize(weight, scales, dtype):
    """transformers' `Fp8Dequantize._dequantize_one`: fp8 (..., N, K) x float32 scales (..., N/bm, K/bn) -> dtype."""
    from tpcli.adapters.transformers_api import fp8_dequantize

    return fp8_dequantize(weight, scales, dtype)


def quantization_record(plan, skipped_keys: list[str]) -> dict:
    """Manifest keys for a sharded folder: `quantization` (null, or the method, block size and whether the shards
    hold the stored or the dequantized representation) and `skipped_keys` (checkpoint keys the model does not use)."""
    q = plan.quantization
    record = None
    if q is not None:
        record = {**q.describe(), "representation": "dequantized" if plan.dequantized else "stored",
                  "scales": scale_pairs(plan.tensors)}
    return {"quantization": record, "skipped_keys": list(skipped_keys)}
