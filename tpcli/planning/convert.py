"""Checkpoint names <-> run-time names, through transformers' own weight converters.

Plan keys and DCP files use run-time names (Mixtral's per-expert `w1/w3` on disk become one fused 3-D
`experts.gate_up_proj`). tpcli never re-implements a conversion: `Conversions.groups` groups checkpoint keys exactly
as `convert_and_load_state_dict_in_model` does, and `realize` lets a deep copy of the matching `WeightConverter`
build the run-time tensors of one group. For the way back, `revert` calls `revert_weight_conversion` one group at
a time. Any group can be run on `meta` tensors first (a dry run) to learn the names, shapes and order of what it
produces without reading a byte.

A model built for a quantized checkpoint carries its quantizer (`model.hf_quantizer`, see `tpcli.planning.quant`); the
conversions are then the ones `from_pretrained` uses with it (`get_model_conversion_mapping(..., hf_quantizer)`):
per-expert scales merged like their weights, or, in the dequantized representation, `Fp8Dequantize` first.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field

from tpcli.errors import CheckpointError


@dataclass
class Group:
    """Checkpoint keys (with the converter pattern each matched) that load into `first_target`."""

    first_target: str
    sources: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.sources]


class Conversions:
    """The weight transforms transformers registers for one (meta) model."""

    def __init__(self, model):
        from tpcli.adapters.transformers_api import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            get_model_conversion_mapping,
            set_weight_conversions,
            weight_conversions,
        )

        self.model = model
        quantizer = getattr(model, "hf_quantizer", None)
        mapping = get_model_conversion_mapping(model, hf_quantizer=quantizer)
        self.renamings = [e for e in mapping if isinstance(e, WeightRenaming)]
        self.converters = [e for e in mapping if isinstance(e, WeightConverter)]
        self.by_pattern = {k: c for c in self.converters for k in c.source_patterns}
        # The way back, as revert_weight_conversion builds it for a model not loaded by from_pretrained.
        back = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        if quantizer is not None:
            back = _quantized_way_back(model, quantizer)
        self.reverts = bool(back)
        if back and weight_conversions(model) is None:
            # revert_weight_conversion rebuilds this very list on every call when the model has none attached: a
            # walk over every module per tensor group, quadratic in the layers (0.8 s of a 12-layer gather).
            # Attach it once, as from_pretrained does for the models it loads.
            set_weight_conversions(model, back)
        self.reverse_converters = [
            c for c in (t.reverse_transform() for t in back[::-1]) if isinstance(c, WeightConverter)
        ]

    def groups(self, checkpoint_keys: list[str]) -> tuple[list[Group], list[str]]:
        """Group checkpoint keys by the run-time tensor they load into. Returns (groups, unexpected keys)."""
        from tpcli.adapters.transformers_api import dot_natural_key, rename_source_key

        meta_sd = self.model.state_dict()
        prefix = self.model.base_model_prefix
        groups: dict[str, Group] = {}
        unexpected: list[str] = []
        for key in sorted(checkpoint_keys, key=dot_natural_key):
            target, pattern = rename_source_key(key, self.renamings, self.converters, prefix, meta_sd)
            if target not in meta_sd and key in meta_sd:
                target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_sd)
            if target not in meta_sd:
                unexpected.append(key)
                continue
            groups.setdefault(target, Group(first_target=target)).sources.append((key, pattern))
        return list(groups.values()), unexpected

    def realize(self, group: Group, load: Callable[[str], object]) -> dict[str, object]:
        """Run the group's transform on tensors returned by `load(checkpoint_key)`: {run-time name: tensor}."""
        from tpcli.adapters.transformers_api import WeightRenaming

        first_pattern = group.sources[0][1]
        if first_pattern is None:
            (key, _), = group.sources
            mapping = WeightRenaming(key, group.first_target)
            mapping.add_tensor(group.first_target, key, key, lambda k=key: load(k))
        else:
            mapping = deepcopy(self.by_pattern[first_pattern])
            for key, pattern in group.sources:
                mapping.add_tensor(group.first_target, key, pattern, lambda k=key: load(k))
        try:
            out = mapping.convert(group.first_target, model=self.model, config=self.model.config)
        except Exception as exc:  # a conversion op failed: the checkpoint does not fit the config
            raise CheckpointError(f"converting {group.keys[0]} -> {group.first_target} failed: {exc}") from None
        return {name: (value[0] if isinstance(value, list) else value) for name, value in out.items()}

    def reverse_groups(self, runtime_names: list[str]) -> list[list[str]]:
        """Group run-time names that `revert_weight_conversion` must see together (usually one name each)."""
        from tpcli.adapters.transformers_api import apply_converters, dot_natural_key

        groups: dict[str, list[str]] = {}
        for name in sorted(runtime_names, key=dot_natural_key):
            target, pattern = apply_converters(name, self.reverse_converters)
            groups.setdefault(target if pattern is not None else name, []).append(name)
        return list(groups.values())

    def revert(self, tensors: dict[str, object]) -> dict[str, object]:
        """Checkpoint names and tensors for one reverse group (transformers' `revert_weight_conversion`)."""
        from tpcli.adapters.transformers_api import revert_weight_conversion

        if not self.reverts:  # what revert_weight_conversion returns when the model has no conversions
            return dict(tensors)
        return revert_weight_conversion(self.model, dict(tensors))


def _quantized_way_back(model, quantizer) -> list:
    """The conversions to revert for a quantized model: the model's, with the quantizer's copies for the scales
    (`experts.gate_up_proj_scale_inv` splits back into per-expert `gate_proj.weight_scale_inv` ...). The quantizer's
    own renamings (`.scale` -> `.weight_scale_inv` for other checkpoint conventions) are left out: reverted, they
    would rename transformers' canonical names. They are set as `model._weight_conversions`, the list
    `revert_weight_conversion` reverts for a model loaded by from_pretrained."""
    from tpcli.adapters.transformers_api import (
        PrefixChange,
        WeightRenaming,
        get_model_conversion_mapping,
        set_weight_conversions,
    )

    plain = get_model_conversion_mapping(model, add_legacy=False)
    quantized = quantizer.update_weight_conversions(plain, model)
    back = [c for c in quantized if not isinstance(c, PrefixChange)
            and not (isinstance(c, WeightRenaming) and not any(c is p for p in plain))]
    set_weight_conversions(model, back or None)
    return back
