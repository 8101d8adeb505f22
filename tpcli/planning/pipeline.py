"""Pipeline stages: which state-dict tensors each PP rank holds, as transformers 5.23 cuts a model into stages.

transformers' `apply_pipeline_parallelism` (`distributed/pipeline_parallel.py`) splits `base_model.layers` by layer
count alone (`PipelineStage.layer_range_for_rank`), for P stages and N layers:

    n = N // P,   stage p owns layers [p * n, (p + 1) * n),   the last stage [(P - 1) * n, N)   (it takes the rest)

e.g. N = 32, P = 3: [0, 10), [10, 20), [20, 32). Every module a stage does not own becomes a parameterless
`PipelineIdentityLayer` before the weights are loaded, so a stage holds only:

    base_model.embed_tokens   stage 0, and the last stage too when tie_word_embeddings (lm_head is tied to it there)
    base_model.layers[i]      the stage whose range holds i
    base_model.norm, lm_head  the last stage
    anything else             every stage (transformers does not replace it)

Stages run one after another (the naive schedule: stage p waits for p - 1's hidden states, the last stage
broadcasts the logits to every stage) and the PP forward returns no loss: inference only in 5.23.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpcli.errors import UsageError


def layer_range(pp: int, stage: int, num_layers: int) -> range:
    """The decoder layers stage `stage` of `pp` owns (`PipelineStage.layer_range_for_rank`)."""
    per_stage = num_layers // pp
    start = stage * per_stage
    return range(start, num_layers if stage == pp - 1 else start + per_stage)


@dataclass(frozen=True)
class Stages:
    """A model's stage layout for `pp` stages: `stages_of(name)` is the set of PP ranks holding a tensor."""

    pp: int
    prefix: str  # the base model's attribute (`base_model_prefix`), e.g. "model"
    num_layers: int
    tied: bool  # config.tie_word_embeddings: the last stage keeps embed_tokens too

    def stages_of(self, name: str) -> frozenset[int]:
        last = self.pp - 1
        base = f"{self.prefix}."
        if name.startswith(f"{base}embed_tokens."):
            return frozenset({0, last} if self.tied else {0})
        if name.startswith((f"{base}norm.", "lm_head.")):
            return frozenset({last})
        if name.startswith(f"{base}layers."):
            index = int(name.split(".")[2])
            return frozenset(p for p in range(self.pp) if index in layer_range(self.pp, p, self.num_layers))
        return frozenset(range(self.pp))

    def layers(self, stage: int) -> range:
        return layer_range(self.pp, stage, self.num_layers)

    def describe(self) -> list[dict]:
        """One entry per stage: its layers and whether it holds the embeddings and the head."""
        return [{"stage": p, "layers": [self.layers(p).start, self.layers(p).stop],
                 "embeddings": p in self.stages_of(f"{self.prefix}.embed_tokens.weight"),
                 "head": p == self.pp - 1} for p in range(self.pp)]


def stage_findings(plan, pp: int) -> list:
    """A warning when some stage owns no decoder layer (pp > N: transformers gives the last stage all N layers
    and the others none, so they only pass the hidden states on)."""
    from tpcli.planning.checks import Finding

    layout = stages(plan, pp)
    empty = [p for p in range(pp) if not layout.layers(p)]
    if not empty:
        return []
    return [Finding("warning", "pp-empty-stage", (
        f"--pp {pp} with {layout.num_layers} decoder layers: transformers' split (layers // pp per stage, the rest on "
        f"the last) leaves stage{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} without a layer, and "
        f"the last stage holds {len(layout.layers(pp - 1))}; use a --pp of at most {layout.num_layers}"))]


def stages(plan, pp: int) -> Stages:
    """The stage layout of `plan`'s model for `pp` stages; a model transformers cannot cut is a UsageError."""
    model = plan.model
    prefix = getattr(model, "base_model_prefix", "") if model is not None else ""
    base = getattr(model, prefix, None) if prefix else None
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(layers, "__len__"):
        raise UsageError(f"--pp {pp}: transformers' pipeline parallelism splits `{prefix or 'base_model'}.layers`, "
                         f"which {plan.architecture} does not have; drop --pp.")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))  # what apply_pipeline_parallelism reads
    return Stages(pp, prefix, len(layers), tied)
