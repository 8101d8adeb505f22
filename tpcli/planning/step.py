"""One training step per rank: what autograd saves for backward and what each collective moves, from the modules.

Per rank of a mesh (tp x fsdp x dp_replicate x ep, `tpcli.planning.mesh`), for B sequences of L tokens per
data-parallel rank, N = B x L, d = the model's element size, the rank's local widths read off its stage-1 local
shapes (q = q_proj rows, kv = k_proj rows, I = gate_proj rows or half of an expert's gate_up rows, V = vocab,
h = hidden, H = q / head_dim local heads, k = experts per token):

    activation_bytes = 8N (ids) + s (embedding output) + 2 L hd d (rope cos, sin) + norm + 4NV + 8N + 4 (loss)
                       + per decoder layer: 2s (two residual streams) + 2 norm + attention + mlp
      s         = N h d in float32 (a bf16 norm saves its float32 copy instead, inside `norm`)
      norm      = 4N (rsqrt) + N h d (x * rsqrt, cast back) + N h d (output) [+ 4Nh: a bf16 input's fp32 copy]
      attention = N q d (rotated queries) + 2 N kv d (keys, values after the cache's cat) + 4 B H L (SDPA's
                  logsumexp) + N q d (SDPA output); q_norm / k_norm add, each, N w d (projection output, the
                  norm's input) + a norm over N x heads rows of head_dim without its output (w = q or kv)
      mlp       = 4 N I d (gate, up, act(gate), act(gate) * up)
      window    = B L^2 d on a sliding-window layer when L >= the window (transformers then materializes the mask
                  and SDPA keeps it in the model dtype; one per layer)
      MoE       = router: N E d (softmax) + 8 N k (top-k ids) + N d (their sum) + N k d (weights), then per
                  token-slot routed to an expert of this rank: 16 (torch.where's index pairs) + d (3h + 4I + 1);
                  at TP every slot (N k); under EP a slot keeps d (2h + 4I + 1) + 16 and N k d + N k h d + 16 N k
                  are added (the combine); the slots received are N k on average (data-dependent: exact summed
                  over the ranks)
    With gradient checkpointing (transformers' default, non-reentrant) a layer keeps only its output (N h d), and
    cos / sin are saved inside the checkpointed layers only (not counted).

    comm_bytes (whole buffers: all_gather = the gathered output, the rest = the input), per rank and step:
      TP   colwise: backward all_reduce of the input gradient, N x in_features x d, one per module
           rowwise: forward all_reduce N x out_features x d; embedding_rowwise: forward all_reduce N h d
           colwise_gather_output: forward all_gather N x t ceil(V / t) x d (DTensor pads), backward all_reduce N h d
           replicated_with_grad_allreduce: backward all_reduce of the parameter's gradient
           moe_tp_experts: forward all_reduce N h d; backward all_reduce N h d + N k d (routing weights)
           gradient checkpointing re-runs each layer's forward up to its last saved tensor: the attention's
           rowwise all_reduce again (the last rowwise of the layer comes after it)
      FSDP every parameter sharded over F > 1 ranks (fsdp, or efsdp for experts): all_gather of its padded
           stage-1 tensor (ceil(rows / F) x F rows) in forward, again in backward unless its unit keeps the full
           weight (`keep_full_weight`, and the root), reduce_scatter of its gradient (same size) once;
           dp_replicate > 1 adds an all_reduce of the gradient shard (padded / F)
      EP   per ep_dispatch_experts block: forward all_to_all of the counts (8 x experts), then dispatch (N k h d)
           and combine (received x h d), the same two in backward; received = N k on average
Measured exactly (tests/oracles/step_oracle.py, tests/test_step.py) for llama, qwen3 (tied, q/k norms) and
mixtral in float32 on CPU, llama in bfloat16, and a sliding-window mistral. Anything else (other
attention kinds, eager attention, scaled embeddings, extra norms (gemma), SSM layers, sequence parallel) raises
StepUnmodelled.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from tpcli.adapters.transformers_api import attn_implementation
from tpcli.errors import ModelError
from tpcli.formats.units import dtype_size
from tpcli.planning.mesh import Mesh, mesh_plan

_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "dropout", "act_fn"}
_ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rotary_emb"}
_LAYER = re.compile(r"^(.*\.layers\.\d+)(?:\.(.*))?$")
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


class StepUnmodelled(ModelError):
    """A module whose saved tensors or collectives tpcli does not model: the step figures are left out."""


@dataclass
class StepCost:
    activation_bytes: int = 0
    comm_bytes: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    by_group: dict = field(default_factory=dict)  # (mesh dim: tp, fsdp, efsdp, ep, dp_replicate, kind) -> bytes

    def add(self, kind: str, n: int, group: str = "tp") -> None:
        self.comm_bytes[kind] += int(n)
        self.by_group[(group, kind)] = self.by_group.get((group, kind), 0) + int(n)

    def merge(self, other: StepCost, times: int) -> None:
        self.activation_bytes += times * other.activation_bytes
        for (group, kind), n in other.by_group.items():
            self.add(kind, times * n, group)

    def to_dict(self) -> dict:
        return {"activation_bytes": self.activation_bytes, "comm_bytes": dict(self.comm_bytes)}


def _norm(n_rows: int, width: int, d: int, output: bool = True) -> int:
    """RMSNorm over n_rows x width, as transformers' RMSNorms compute it (in float32, cast back): rsqrt (fp32),
    x * rsqrt cast to the model dtype, the output when a linear layer reads it next, and a bf16/fp16 input's fp32
    copy (a float32 input is itself saved; the caller counts it)."""
    return (4 * n_rows + n_rows * width * d + (n_rows * width * d if output else 0)
            + (4 * n_rows * width if d != 4 else 0))


class StepModel:
    """The model's modules reduced to what a step saves and sends; built once per (model, mesh)."""

    def __init__(self, plan, mesh: Mesh):
        self.plan, self.mesh = plan, mesh
        self.mp = mesh_plan(plan, mesh)
        model = plan.model
        if model is None or model.get_output_embeddings() is None:
            raise StepUnmodelled(f"{plan.architecture}: no language-modelling head to take a step with.")
        text = plan.config.get_text_config(decoder=True)
        self.text = text
        if attn_implementation(text) not in (None, "sdpa"):
            raise StepUnmodelled(f"{plan.architecture}: attention {attn_implementation(text)!r} is not modelled "
                                 "(SDPA is).")
        if any(t not in (None, "full_attention", "sliding_attention")
               for t in (getattr(text, "layer_types", None) or [])):
            raise StepUnmodelled(f"{plan.architecture}: layer types {sorted(set(text.layer_types))} are not modelled "
                                 "(full and sliding-window attention are).")
        self.window = getattr(text, "sliding_window", None)
        sp = sorted(k for k, style in self.mp.tp_plan.items() if style == "sequence_parallel") if mesh.tp > 1 else []
        if sp:  # transformers 5.23's style re-wraps each rank's whole input as a sequence shard: not counted here
            raise StepUnmodelled(f"{plan.architecture}: {sp[0]}: style 'sequence_parallel' is not modelled by "
                                 "tpcli's step costs (colwise, rowwise are); drop it from --plan for the step figures.")
        if mesh.tp > 1 and mesh.ep > 1:  # measured: each TP rank dispatches part of the tokens, then gathers
            raise StepUnmodelled(f"{plan.architecture}: EP together with TP (--tp {mesh.tp} --ep {mesh.ep}) is not "
                                 "modelled by tpcli's step costs (its dispatch splits the tokens over the TP ranks); "
                                 "EP with FSDP and TP alone are.")
        self.d = dtype_size(plan.dtype)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        modules = plan.__dict__.get("_step_modules")
        if modules is None:  # the model's structure, the same for every mesh
            modules = plan.__dict__["_step_modules"] = (
                self._layers(model), self._module_name(model, model.get_input_embeddings()),
                self._module_name(model, model.get_output_embeddings()),
                any(n.endswith("rotary_emb") for n, _ in model.named_modules()))
        layers, self.embed, self.head, self.rope = modules
        self.layers = self._layer_kinds(layers)

    @staticmethod
    def _module_name(model, module) -> str:
        return next(n for n, m in model.named_modules() if m is module)

    def _layers(self, model) -> list[tuple[str, object, bool]]:
        """(name, decoder layer, sliding window) for every decoder layer whose modules the step model covers."""
        out = []
        if type(model.get_input_embeddings()) is not torch_embedding():
            raise StepUnmodelled(f"{self.plan.architecture}: input embedding {type(model.get_input_embeddings()).__name__}"
                                 " is not modelled by tpcli's step costs (nn.Embedding is).")
        types = getattr(self.text, "layer_types", None)
        for name, module in model.named_modules():
            if name.endswith(".layers") and hasattr(module, "__len__"):
                for i, layer in enumerate(module):
                    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
                    extra = ({n for n, _ in layer.named_children()} - _LAYER_CHILDREN
                             | ({n for n, _ in attn.named_children()} - _ATTENTION_CHILDREN if attn else set()))
                    ok = (attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
                          and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
                          and mlp is not None and (all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))
                                                   or (hasattr(mlp, "experts") and hasattr(mlp, "gate"))))
                    if not ok or extra or "RMSNorm" not in type(layer.input_layernorm).__name__:
                        more = f"; it has {', '.join(sorted(extra))}" if extra else ""
                        raise StepUnmodelled(f"{self.plan.architecture}: decoder layer {name}.{i} "
                                             f"({type(layer).__name__}) is not modelled by tpcli's step costs "
                                             f"(attention q/k/v/o [+ q/k norms] + two RMSNorms + gated MLP or MoE "
                                             f"are{more}).")
                    sliding = types[i] == "sliding_attention" if types else bool(self.window)
                    out.append((f"{name}.{i}", layer, sliding))
        if not out:
            raise StepUnmodelled(f"{self.plan.architecture}: no decoder layers found for the step costs.")
        return out

    def _layer_kinds(self, layers: list) -> list[tuple[str, object, int, bool]]:
        """Layers that cost the same (class, parameter shapes, styles, window): (first name, module, count,
        sliding)."""
        by_layer: dict = {}  # "model.layers.3" -> [(plan index, rest of the name, style)]
        for i, plan in enumerate((self.mp.tp_plan if self.mesh.tp > 1 else {}, self.mp.ep_plan, self.mp.fsdp_plan)):
            for key, style in plan.items():
                m = _LAYER.match(key)
                if m:
                    by_layer.setdefault(m.group(1), []).append((i, m.group(2), style))
        kinds: dict = {}
        for name, layer, sliding in layers:
            params = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
            styles = tuple(sorted(by_layer.get(name, [])))
            key = (type(layer).__name__, params, styles, name in self.mp.fsdp_plan, sliding)
            if key in kinds:
                kinds[key][2] += 1
            else:
                kinds[key] = [name, layer, 1, sliding]
        return [tuple(v) for v in kinds.values()]

    # local shapes --------------------------------------------------------------------------------------------
    def _local(self, name: str, coords) -> tuple[int, ...]:
        g = self.mp.group_of.get(name)
        if g is None:
            tied = self.plan.tensors.get(name)
            g = self.mp.group_of[tied.tied_to] if tied is not None and tied.tied_to else None
        if g is None:
            raise StepUnmodelled(f"{self.plan.architecture}: {name} not found for the step costs.")
        t, _, _, e = coords
        return g.stage1(t, e, self.mesh)

    def _style(self, module: str) -> str | None:
        return self.mp.tp_plan.get(module) if self.mesh.tp > 1 else None

    # the step ------------------------------------------------------------------------------------------------
    def rank_cost(self, coords, batch: int, seq_len: int, checkpointing: bool = False) -> StepCost:
        """coords = (t, f, efsdp, e); batch sequences of seq_len tokens on this rank."""
        d, text, tp = self.d, self.text, self.mesh.tp
        n = batch * seq_len
        h = text.hidden_size
        cost = StepCost()
        stream = n * h * d if d == 4 else 0
        vocab = text.vocab_size
        act = 8 * n + stream + _norm(n, h, d) + 4 * n * vocab + 8 * n + 4
        if self.rope and not checkpointing:  # with checkpointing only the recomputed layers read cos and sin
            act += 2 * seq_len * self.head_dim * d
        if self._style(self.embed) == "embedding_rowwise":
            cost.add("all_reduce", n * h * d)
        head_style = self._style(self.head)
        if head_style == "colwise_gather_output":
            cost.add("all_gather", n * tp * math.ceil(text.vocab_size / tp) * d)
            cost.add("all_reduce", n * h * d)
        elif head_style not in (None, "colwise"):
            raise StepUnmodelled(f"{self.plan.architecture}: lm_head style {head_style!r} is not modelled.")
        cost.activation_bytes = act
        for name, layer, count, sliding in self.layers:
            one = StepCost()
            one.activation_bytes = self._layer(name, layer, coords, batch, seq_len, one, checkpointing)
            if sliding and seq_len >= self.window and not checkpointing:
                # transformers materializes the window's mask (kv_length >= window) and SDPA keeps it as floats
                one.activation_bytes += batch * seq_len * seq_len * self.d
            cost.merge(one, count)
        self._fsdp(coords, cost)
        return cost

    def _layer(self, name, layer, coords, batch, seq_len, cost: StepCost, checkpointing: bool) -> int:
        d, h, n = self.d, self.text.hidden_size, batch * seq_len
        stream = n * h * d if d == 4 else 0
        a = f"{name}.self_attn"
        q = self._local(f"{a}.q_proj.weight", coords)[0]
        kv = self._local(f"{a}.k_proj.weight", coords)[0]
        heads, kv_heads = q // self.head_dim, kv // self.head_dim
        saved = 2 * stream + 2 * _norm(n, h, d)
        saved += 2 * n * q * d + 2 * n * kv * d + 4 * batch * heads * seq_len
        attn = layer.self_attn
        for norm, width, rows in (("q_norm", q, heads), ("k_norm", kv, kv_heads)):
            if getattr(attn, norm, None) is not None:
                saved += (n * width * d if d == 4 else 0) + _norm(n * rows, self.head_dim, d, output=False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self._linear_comm(f"{a}.{proj}", cost, n, checkpointing)
        for norm in ("q_norm", "k_norm"):
            self._grad_allreduce(f"{a}.{norm}", cost)
        m = f"{name}.mlp"
        if hasattr(layer.mlp, "experts"):
            saved += self._moe(m, layer.mlp, coords, n, cost)
        else:
            inter = self._local(f"{m}.gate_proj.weight", coords)[0]
            saved += 4 * n * inter * d
            for proj in ("gate_proj", "up_proj", "down_proj"):
                self._linear_comm(f"{m}.{proj}", cost, n, False)
        return n * h * d if checkpointing else saved

    def _linear_comm(self, module: str, cost: StepCost, n: int, recompute: bool) -> None:
        style = self._style(module)
        if style is None:
            return
        weight = self.plan.tensors[f"{module}.weight"].shape
        if style == "colwise":
            cost.add("all_reduce", n * weight[1] * self.d)
        elif style == "rowwise":
            cost.add("all_reduce", n * weight[0] * self.d * (2 if recompute else 1))
        else:
            raise StepUnmodelled(f"{self.plan.architecture}: {module}: style {style!r} is not modelled by tpcli's "
                                 "step costs (colwise, rowwise are).")

    def _grad_allreduce(self, module: str, cost: StepCost) -> None:
        style = self._style(module)
        if style == "replicated_with_grad_allreduce":
            cost.add("all_reduce", sum(self.plan.tensors[p].nbytes for p in (f"{module}.weight", f"{module}.bias")
                                       if p in self.plan.tensors))
        elif style is not None:
            raise StepUnmodelled(f"{self.plan.architecture}: {module}: style {style!r} is not modelled.")

    def _moe(self, m: str, mlp, coords, n: int, cost: StepCost) -> int:
        d, text, h = self.d, self.text, self.text.hidden_size
        experts = self.plan.tensors[f"{m}.experts.gate_up_proj"].shape[0]
        k = text.num_experts_per_tok
        gate_up = self._local(f"{m}.experts.gate_up_proj", coords)
        inter = gate_up[1] // 2
        saved = n * experts * d + 8 * n * k + n * d + n * k * d
        slot = 16 + d * (3 * h + 4 * inter + 1)
        ep_style = self.mp.ep_plan.get(f"{m}.experts") if self.mesh.ep > 1 else None
        style = self._style(f"{m}.experts")
        if ep_style == "ep_dispatch_experts":
            saved += n * k * (slot - d * h + 16 + d + h * d)  # the down projection's output is not kept here
            cost.add("all_to_all", 8 * experts + 4 * n * k * h * d, "ep")
        elif ep_style is not None:
            raise StepUnmodelled(f"{self.plan.architecture}: {m}.experts: EP style {ep_style!r} is not modelled.")
        else:
            saved += n * k * slot
            if style == "moe_tp_experts":
                cost.add("all_reduce", 2 * n * h * d + n * k * d)
            elif style is not None:
                raise StepUnmodelled(f"{self.plan.architecture}: {m}.experts: style {style!r} is not modelled.")
        return saved

    def _fsdp(self, coords, cost: StepCost, inference: bool = False, first: bool = True) -> None:
        """FSDP's collectives (module docstring): per unit of `fully_shard`, each parameter's padded stage-1 bytes."""
        mesh = self.mesh
        if mesh.dp_size < 2:
            return
        t, _, _, e = coords
        if not hasattr(self, "_units"):  # units with the same tensors and reshard policy: one of each, counted
            self._units = Counter((tuple(sorted(groups.items(), key=repr)),
                                   unit == "" or self.mp.fsdp_plan.get(unit) == "keep_full_weight")
                                  for unit, groups in self.mp.units.items())
        for (groups, keep), units in self._units.items():
            for g, n in groups:
                count = n * units
                ranks = mesh.fsdp if g.fsdp == "fsdp" else mesh.efsdp
                shape = g.stage1(t, e, mesh)
                if not shape:
                    continue
                padded = count * math.ceil(shape[0] / ranks) * ranks * math.prod(shape[1:]) * dtype_size(g.dtype)
                if ranks > 1 and inference:
                    if first or not keep:
                        cost.add("all_gather", padded, g.fsdp)
                elif ranks > 1:
                    cost.add("all_gather", padded * (1 if keep else 2), g.fsdp)
                    cost.add("reduce_scatter", padded, g.fsdp)
                if mesh.dp_replicate > 1 and not inference:
                    cost.add("all_reduce", padded // ranks, "dp_replicate")

    def forward_comm(self, coords, n: int, batch: int, first: bool) -> dict:
        """One no-grad forward over n tokens of `batch` sequences (see `inference_comm`)."""
        d, text, tp, h = self.d, self.text, self.mesh.tp, self.text.hidden_size
        cost = StepCost()
        if self._style(self.embed) == "embedding_rowwise":
            cost.add("all_reduce", n * h * d)
        if self._style(self.head) == "colwise_gather_output":
            cost.add("all_gather", batch * tp * math.ceil(text.vocab_size / tp) * d)
        for name, layer, count, _ in self.layers:
            one = StepCost()
            modules = [f"{name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            if not hasattr(layer.mlp, "experts"):
                modules += [f"{name}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
            for module in modules:
                if self._style(module) not in (None, "colwise", "rowwise"):
                    raise StepUnmodelled(f"{self.plan.architecture}: {module}: style {self._style(module)!r} is not "
                                         "modelled by tpcli's step costs (colwise, rowwise are).")
                if self._style(module) == "rowwise":
                    one.add("all_reduce", n * self.plan.tensors[f"{module}.weight"].shape[0] * d)
            if hasattr(layer.mlp, "experts"):
                m = f"{name}.mlp"
                if self.mesh.ep > 1 and self.mp.ep_plan.get(f"{m}.experts") == "ep_dispatch_experts":
                    experts = self.plan.tensors[f"{m}.experts.gate_up_proj"].shape[0]
                    one.add("all_to_all", 8 * experts + 2 * n * text.num_experts_per_tok * h * d, "ep")
                elif self._style(f"{m}.experts") == "moe_tp_experts":
                    one.add("all_reduce", n * h * d)
            cost.merge(one, count)
        self._fsdp(coords, cost, inference=True, first=first)
        return dict(cost.comm_bytes)


def inference_comm(model: StepModel, coords, batch: int, seq_len: int) -> dict:
    """Bytes per collective of one generate() forward on this rank: {"prefill": {...}, "decode_token": {...}}.

    Forward only, no gradients (transformers' inference paths): N = B x L tokens at prefill, N = B per new token;
      TP   rowwise: all_reduce N x out_features x d; embedding_rowwise: all_reduce N h d; moe_tp_experts:
           all_reduce N h d; colwise: nothing; colwise_gather_output (lm_head): all_gather B x t ceil(V / t) x d
           (generate computes the logits of the last position only)
      FSDP all_gather of every sharded parameter (padded) at prefill; per new token again, except the units that keep
           their full weight (`keep_full_weight`, the root), which stay gathered after the first forward
      EP   per ep_dispatch_experts block: all_to_all 8 x experts (counts) + N k h d (dispatch) + received x h d
           (combine; N k h d on average, exact summed over the ranks)
    """
    return {"prefill": model.forward_comm(coords, batch * seq_len, batch, first=True),
            "decode_token": model.forward_comm(coords, batch, batch, first=False)}


def torch_embedding():
    import torch

    return torch.nn.Embedding


def step_ranks(plan, mesh: Mesh, batch: int, seq_len: int, checkpointing: bool = False) -> list[dict]:
    """Per rank of `mesh`: {"activation_bytes", "comm_bytes"} for one training step (module docstring)."""
    model = step_model(plan, mesh)
    cache: dict = {}
    out = []
    for rank in range(mesh.world):
        c = mesh.coords(rank)
        key = (c["tp"], c["ep"])  # the figures depend on the stage-1 shards only (FSDP pads to the group size)
        if key not in cache:
            cache[key] = model.rank_cost((c["tp"], 0, 0, c["ep"]), batch, seq_len, checkpointing).to_dict()
        out.append(cache[key])
    return out


def inference_ranks(plan, mesh: Mesh, batch: int, seq_len: int) -> list[dict]:
    """Per rank of `mesh`: {"prefill": comm_bytes, "decode_token": comm_bytes} of generate() (`inference_comm`)."""
    model = step_model(plan, mesh)
    cache: dict = {}
    out = []
    for rank in range(mesh.world):
        c = mesh.coords(rank)
        key = (c["tp"], c["ep"])
        if key not in cache:
            cache[key] = inference_comm(model, (c["tp"], 0, 0, c["ep"]), batch, seq_len)
        out.append(cache[key])
    return out


def step_model(plan, mesh: Mesh) -> StepModel:
    """The StepModel of (plan, mesh), kept on the plan (a mesh table asks for many)."""
    cache = plan.__dict__.setdefault("_step_models", {})
    if mesh not in cache:
        cache[mesh] = StepModel(plan, mesh)
    return cache[mesh]
