"""Tiny random models built locally (no hub): the demo's embedded default, the tests' fixtures, the benchmarks.

    build_tiny("qwen3", out)  -> a 2-layer Qwen3 with tied embeddings, vocab 1001 (uneven at tp=2 and 3)

Kinds: llama, qwen3 (tied, q/k norm), mixtral (MoE, converted experts), qwen3_moe, phi3 (packed gate_up), opt,
and the sliding-window kinds gemma2 and gemma3 (`gemma3_text`): layer 0 slides over a 16-token window, layer 1
attends to everything (`sliding_window=`, `layer_types=` to change), the composite kinds in `_COMPOSITE` (MLA,
multimodal), and the kinds of architectures served by plans/ (`LIBRARY_KINDS`: gpt2, gptj, stablelm, gpt_oss,
gpt_neo, biogpt, xglm, persimmon, mpt; `FUSED_QKV_KINDS`: falcon (grouped KV), falcon-mha (ALiBi), falcon-mq
(multi-query), bloom (ALiBi), gpt_bigcode (multi-query), gpt_bigcode-mha), and `SHRUNK_KINDS`: transformers' own
default configs shrunk, for the cache layouts (olmo2 gathered K/V; deepseek_v2, longcat_flash MLA; qwen3_next,
minimax, jamba, granitemoehybrid, falcon_h1 linear-attention / SSM layers). `heads=6, kv_heads=3` makes a model
valid at tp=3. Weights are random but seeded, saved with `save_pretrained`; the model class is the one
`architectures` names.
"""

from __future__ import annotations

from pathlib import Path

from tpcli.adapters.transformers_api import auto_model_class, from_config

# Sliding-window kinds: tpcli kind -> transformers model_type.
SLIDING_KINDS = {"gemma2": "gemma2", "gemma3": "gemma3_text"}
KINDS = ("llama", "qwen3", "mixtral", "qwen3_moe", "phi3", "opt", *SLIDING_KINDS, "deepseek_v3", "qwen2_5_vl", "llama4")


def _deepseek_v3(common: dict, hidden: int, heads: int, intermediate: int, experts: int, extra: dict) -> dict:
    """MLA attention (q/kv low-rank projections, a shared RoPE key) + routed and shared experts; layer 0 dense.

    Overrides (q_lora_rank, kv_lora_rank, qk_rope_head_dim, ...) go into the constructor, which derives qk_head_dim.
    """
    kwargs = dict(common, moe_intermediate_size=intermediate, n_routed_experts=experts, n_shared_experts=1,
                  num_experts_per_tok=min(2, experts), n_group=1, topk_group=1, first_k_dense_replace=1,
                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                  architectures=["DeepseekV3ForCausalLM"])
    kwargs.update(extra)
    extra.clear()
    return kwargs


def _qwen2_5_vl(common: dict, hidden: int, heads: int, intermediate: int, experts: int, extra: dict) -> dict:
    """A vision tower (2 blocks) + the Qwen2 text model; the checkpoint declares Qwen2_5_VLForConditionalGeneration."""
    head_dim = common["head_dim"]
    text = dict(common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4]})
    text.pop("head_dim")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[1], window_size=28, patch_size=14, spatial_merge_size=2)
    return dict(text_config=text, vision_config=vision, architectures=["Qwen2_5_VLForConditionalGeneration"],
                tie_word_embeddings=False)


def _llama4(common: dict, hidden: int, heads: int, intermediate: int, experts: int, extra: dict) -> dict:
    """Llama 4: text MoE layers with a shared expert + a vision tower; Llama4ForConditionalGeneration."""
    text = dict(common, intermediate_size_mlp=intermediate * 2, num_local_experts=experts, num_experts_per_tok=1,
                interleave_moe_layer_step=1, attention_chunk_size=64, no_rope_layer_interval=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5, rope_theta=10000)
    return dict(text_config=text, vision_config=vision, architectures=["Llama4ForConditionalGeneration"])


# Kinds whose config is not one flat AutoConfig.for_model(kind, **common) call: kind -> kwargs builder.
_COMPOSITE = {"deepseek_v3": _deepseek_v3, "qwen2_5_vl": _qwen2_5_vl, "llama4": _llama4}


# Architectures TP'd through plans/ (tpcli.planning.plans_library): config keywords in each model's own vocabulary.
# f(hidden, layers, heads, kv_heads, vocab, intermediate, experts) -> AutoConfig.for_model keywords.
def _library_kinds() -> dict:
    return {
        "gpt2": lambda h, n, a, kv, v, i, e: dict(n_embd=h, n_layer=n, n_head=a, n_inner=i, vocab_size=v,
                                                  n_positions=256),
        "gptj": lambda h, n, a, kv, v, i, e: dict(n_embd=h, n_layer=n, n_head=a, n_inner=i, vocab_size=v,
                                                  n_positions=256, rotary_dim=(h // a) // 2),
        "stablelm": lambda h, n, a, kv, v, i, e: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                                      num_key_value_heads=kv, intermediate_size=i, vocab_size=v,
                                                      max_position_embeddings=256, use_qkv_bias=True,
                                                      partial_rotary_factor=0.25),
        "gpt_oss": lambda h, n, a, kv, v, i, e: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                                     num_key_value_heads=kv, head_dim=h // a, intermediate_size=i,
                                                     vocab_size=v, num_local_experts=e, num_experts_per_tok=2,
                                                     max_position_embeddings=256, sliding_window=8,
                                                     layer_types=["sliding_attention", "full_attention"] * (n // 2)
                                                     + ["sliding_attention"] * (n % 2)),
        "gpt_neo": lambda h, n, a, kv, v, i, e: dict(hidden_size=h, num_layers=n, num_heads=a, intermediate_size=i,
                                                     vocab_size=v, max_position_embeddings=256, window_size=8,
                                                     attention_types=[[["global", "local"], n // 2]]),
        "biogpt": lambda h, n, a, kv, v, i, e: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                                    intermediate_size=i, vocab_size=v, max_position_embeddings=256),
        "xglm": lambda h, n, a, kv, v, i, e: dict(d_model=h, num_layers=n, attention_heads=a, ffn_dim=i, vocab_size=v,
                                                  max_position_embeddings=256),
        "persimmon": lambda h, n, a, kv, v, i, e: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                                       intermediate_size=i, vocab_size=v, max_position_embeddings=256),
        "mpt": lambda h, n, a, kv, v, i, e: dict(d_model=h, n_layers=n, n_heads=a, vocab_size=v, max_seq_len=256,
                                                 attn_config={"alibi": True}),
    }


LIBRARY_KINDS = tuple(_library_kinds())
KINDS = KINDS + LIBRARY_KINDS


def tiny_config(kind: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 1001,
                intermediate: int = 96, experts: int = 4, dtype: str = "float32", **extra):
    from transformers import AutoConfig

    if kind in FUSED_QKV_KINDS:
        return _fused_qkv_config(kind, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab,
                                 intermediate=intermediate, dtype=dtype, **extra)
    if kind in SHRUNK_KINDS:
        extra = dict(extra)
        cfg = _shrunk_config(kind, hidden=hidden, layers=layers, heads=heads, vocab=vocab, intermediate=intermediate,
                             extra=extra)
        cfg.dtype = dtype
        if not getattr(cfg, "architectures", None):
            from transformers import AutoModelForCausalLM

            cfg.architectures = [auto_model_class(AutoModelForCausalLM, cfg).__name__]
        return cfg
    head_dim = hidden // heads if hidden % heads == 0 else 16
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=vocab,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind in SLIDING_KINDS:
        cfg = _sliding_config(kind, common, kv_heads=kv_heads, intermediate=intermediate, head_dim=head_dim,
                              layers=layers, extra=extra)
    elif kind in LIBRARY_KINDS:
        kwargs = _library_kinds()[kind](hidden, layers, heads, kv_heads, vocab, intermediate, experts)
        cfg = AutoConfig.for_model(kind, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
    elif kind == "opt":
        cfg = AutoConfig.for_model("opt", ffn_dim=intermediate, word_embed_proj_dim=hidden, enable_bias=True, **common)
    else:
        common.update(num_key_value_heads=kv_heads, intermediate_size=intermediate)
        if kind in ("llama", "qwen3", "mixtral", "qwen3_moe", "qwen2_5_vl", "llama4"):
            common["head_dim"] = head_dim
        if kind == "qwen3":
            common.setdefault("tie_word_embeddings", True)
        if kind == "mixtral":
            common.update(num_local_experts=experts, num_experts_per_tok=min(2, experts))
        if kind == "qwen3_moe":
            common.update(num_experts=experts, num_experts_per_tok=min(2, experts), moe_intermediate_size=intermediate,
                          decoder_sparse_step=1, mlp_only_layers=[])
        if kind in _COMPOSITE:
            common = _COMPOSITE[kind](common, hidden, heads, intermediate, experts, extra)
        cfg = AutoConfig.for_model(kind, **common)
    for key, value in extra.items():
        setattr(cfg, key, value)
    cfg.dtype = dtype
    if not getattr(cfg, "architectures", None):
        from transformers import AutoModelForCausalLM

        cfg.architectures = [auto_model_class(AutoModelForCausalLM, cfg).__name__]
    return cfg


def _sliding_config(kind: str, common: dict, *, kv_heads: int, intermediate: int, head_dim: int, layers: int,
                    extra: dict):
    """gemma2 / gemma3_text with a short sliding window: sliding and full layers alternate, sliding first."""
    from transformers import AutoConfig

    window = extra.pop("sliding_window", 16)
    layer_types = extra.pop("layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return AutoConfig.for_model(SLIDING_KINDS[kind], num_key_value_heads=kv_heads, intermediate_size=intermediate,
                                head_dim=head_dim, sliding_window=window, layer_types=layer_types, **common)


# --- fused-QKV architectures whose TP plans come from plans/ (falcon, bloom, gpt_bigcode) ---------------------------
# Kinds are named after their plans (tests/test_plans_library.py builds kind NAME for plans/NAME.json). Head counts
# split into whole heads (and KV groups) at tp=2 and tp=4; BLOOM's 12 heads take the non-power-of-two ALiBi branch.
# Biases are on where the architecture has them, so a bias added tp times after a row-wise reduction would show.
FUSED_QKV_KINDS = {
    # Falcon-40B/180B layout: grouped KV heads, query_key_value = per KV group [q x heads/kv, k, v]
    "falcon": dict(heads=8, kv_heads=4, new_decoder_architecture=True, multi_query=False, bias=True),
    # falcon-rw layout: one K/V head per query head, query_key_value = per head [q, k, v]; ALiBi, sequential blocks
    "falcon-mha": dict(heads=8, new_decoder_architecture=False, multi_query=False, alibi=True, parallel_attn=False,
                       bias=True),
    # Falcon-7B layout: multi-query, query_key_value = [q x heads, k, v] with one K/V head
    "falcon-mq": dict(heads=4, new_decoder_architecture=False, multi_query=True, bias=True),
    # BLOOM: query_key_value interleaved per head [q, k, v], ALiBi slopes per head
    "bloom": dict(hidden=96, heads=12),
    # StarCoder/SantaCoder layout: multi-query, c_attn = [q x heads, k, v]
    "gpt_bigcode": dict(heads=4, multi_query=True),
    # GPTBigCode without multi-query: c_attn = per head [q, k, v]
    "gpt_bigcode-mha": dict(heads=4, multi_query=False),
}
KINDS = KINDS + tuple(FUSED_QKV_KINDS)


# --- transformers' own default configs, shrunk (the cache layouts of issue 30 and the gathered-KV families) ---------
# kind -> (model_type, overrides of AutoConfig.for_model(model_type)'s defaults). Every size the cache depends on is
# set here, so the tests' byte counts do not move when a default changes.
_LIN = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
SHRUNK_KINDS = {
    # k_proj/v_proj `colwise_gather_output`: every KV head cached on every rank
    "olmo2": ("olmo2", dict(num_key_value_heads=2, head_dim=16)),
    # MLA, kv_a_proj_with_mqa `mla_kv_a_proj`: latent (kv_lora_rank) + rope key, one "head", every rank whole
    "deepseek_v2": ("deepseek_v2", dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=8, head_dim=8, n_routed_experts=4,
                                        n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                                        first_k_dense_replace=1, n_group=1, topk_group=1)),
    # MLA in two attention sublayers per decoder layer: 2 cache layers per layer (num_hidden_layers = 2 x num_layers)
    "longcat_flash": ("longcat_flash", dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                                            qk_nope_head_dim=8, v_head_dim=8, head_dim=8, ffn_hidden_size=96,
                                            n_routed_experts=4, zero_expert_num=2, moe_topk=2,
                                            expert_ffn_hidden_size=32)),
    # gated delta net (3 layers: conv + recurrent state) + 1 full-attention layer
    "qwen3_next": ("qwen3_next", dict(num_hidden_layers=4, layer_types=_LIN, num_key_value_heads=2, head_dim=16,
                                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                      linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=32)),
    # lightning attention (3 layers: one (heads, head_dim, head_dim) state) + 1 full-attention layer
    "minimax": ("minimax", dict(num_hidden_layers=4, layer_types=_LIN, num_key_value_heads=2, head_dim=16,
                                num_local_experts=4, num_experts_per_tok=2, block_size=16)),
    # mamba (layers 0, 2: conv + ssm state) and attention (layers 1, 3)
    "jamba": ("jamba", dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                            expert_layer_offset=1, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8)),
    # mamba2 layers (0, 2) and attention layers (1, 3)
    "granitemoehybrid": ("granitemoehybrid", dict(
        num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "attention"], num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32, mamba_n_heads=8, mamba_n_groups=1,
        mamba_d_state=8, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)),
    # every layer is attention and mamba2 side by side ("hybrid")
    "falcon_h1": ("falcon_h1", dict(num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4,
                                    mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                                    mamba_chunk_size=16)),
}
KINDS = KINDS + tuple(k for k in SHRUNK_KINDS if k not in KINDS)


def _shrunk_config(kind: str, *, hidden, layers, heads, vocab, intermediate, extra: dict):
    """transformers' default config of `kind`, shrunk: sizes from tiny_config's arguments and SHRUNK_KINDS."""
    from transformers import AutoConfig

    model_type, preset = SHRUNK_KINDS[kind]
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=vocab,
                  intermediate_size=intermediate, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    kwargs.update(preset)
    kwargs.update(extra)
    extra.clear()
    return AutoConfig.for_model(model_type, **kwargs)


def _fused_qkv_config(kind: str, *, hidden, layers, heads, kv_heads, vocab, intermediate, dtype, **extra):
    from transformers import AutoConfig

    preset = dict(FUSED_QKV_KINDS[kind])
    # the preset's head layout replaces tiny_config's generic defaults (64/4/2); other values are the caller's
    layout = {"hidden": (hidden, 64), "heads": (heads, 4), "kv_heads": (kv_heads, 2)}
    hidden, heads, kv_heads = (preset.pop(k) if k in preset and given == default else given
                               for k, (given, default) in layout.items())
    for k in layout:
        preset.pop(k, None)
    preset.update(extra)
    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind.startswith("falcon"):
        if not preset.get("new_decoder_architecture"):  # one K/V head per query head (multi_query ignores it)
            kv_heads = heads
        cfg = AutoConfig.for_model("falcon", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   num_kv_heads=kv_heads, ffn_hidden_size=intermediate, max_position_embeddings=256,
                                   **ids, **preset)
    elif kind == "bloom":
        cfg = AutoConfig.for_model("bloom", hidden_size=hidden, n_layer=layers, n_head=heads, **ids, **preset)
    else:
        cfg = AutoConfig.for_model("gpt_bigcode", n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                                   n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids, **preset)
    cfg.dtype = dtype
    return cfg


def build_tiny(kind: str, out: str | Path, *, seed: int = 0, max_shard_size: str | None = None,
               tokenizer: bool = False, quantize: str | None = None, block: int = 16, **overrides) -> Path:
    """Build, randomly initialise and save a tiny model of `kind` into `out`; returns the folder.

    `quantize="fp8"` then rewrites it as a block-scaled FP8 checkpoint (`quantize_fp8`, blocks of `block` x `block`)."""
    import torch
    from transformers import logging as hf_logging

    from tpcli.planning.plan import model_class

    hf_logging.disable_progress_bar()
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(KINDS)}")
    cfg = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = from_config(model_class(cfg), cfg, dtype=getattr(torch, cfg.dtype))
    with torch.no_grad():  # norms start at 1.0; perturb them so a wrong slice of them would show in the numerics
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("_bias"):  # gpt_oss experts' biases are 2-D and start at 0
                p.add_(torch.randn_like(p) * 0.1)
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if tokenizer:
        write_tokenizer(out, cfg.vocab_size)
    if quantize == "fp8":
        quantize_fp8(out, block=(block, block))
    elif quantize is not None:
        raise ValueError(f"unknown quantization {quantize!r}; choose fp8")
    return out


FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}  # as Qwen3-FP8, DeepSeek-V3 ship it


def quantize_fp8(folder: str | Path, *, block: tuple[int, int] = (16, 16)) -> Path:
    """Rewrite the checkpoint in `folder` (in place) in the layout of DeepSeek-V3 / Qwen3-FP8 checkpoints.

    Every checkpoint weight that transformers' FP8 quantizer loads into an `FP8Linear` or `FP8Experts` parameter
    becomes float8_e4m3fn plus a float32 `weight_scale_inv` with one inverse scale per `block` tile, computed by
    transformers' own `Fp8Quantize` op (the one `save_pretrained` uses to re-quantize); per-expert keys stay per
    expert (`mlp.experts.0.gate_proj.weight` + `mlp.experts.0.gate_proj.weight_scale_inv`). What the quantizer leaves
    unconverted (lm_head, embeddings, norms, MoE routers) keeps its dtype. config.json gets `quantization_config`.
    """
    import json

    import torch
    from safetensors.torch import save_file

    from tpcli.adapters.transformers_api import Fp8Quantize, fp8_quantize
    from tpcli.formats.rankfile import RankFile
    from tpcli.planning.convert import Conversions
    from tpcli.planning.plan import build_meta_model, load_config
    from tpcli.planning.quant import apply_quantizer

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    tensors: dict = {}
    for f in files:
        with RankFile(f) as tf:
            tensors.update({k: tf.get_tensor(k) for k in tf.keys()})
    config = load_config(folder)
    config.quantization_config = {**FP8_CONFIG, "weight_block_size": list(block)}
    model = build_meta_model(config)
    quantizer = apply_quantizer(model, config, dequantize=False)
    fp8 = {n for n, t in model.state_dict().items() if t.dtype == torch.float8_e4m3fn}
    groups, _ = Conversions(model).groups(list(tensors))
    op = Fp8Quantize(quantizer)
    out: dict = {}
    for group in groups:
        for key in group.keys:
            if group.first_target in fp8:
                pair = fp8_quantize(op, key, tensors[key])
                if len(pair) != 2:
                    raise ValueError(f"{key} {list(tensors[key].shape)} does not tile into {block} blocks")
                out.update(pair)
            else:
                out[key] = tensors[key]
    for f in files:
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = config.quantization_config
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level tokenizer whose vocabulary fits `vocab_size`, so demo generations decode to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
    # fill the rest of the vocabulary with " syllable" tokens so that any generated id decodes to text
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    two = [c + v for c in consonants for v in vowels]
    syllables = two + [a + b for a in two for b in two]
    for syl in syllables:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault("\u0120" + syl, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert len(vocab) <= vocab_size
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    """python -m tpcli.testing KIND OUT [--tokenizer] [--hidden N --layers N --heads N --kv-heads N --vocab N]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tpcli.testing", description="Build a tiny random model locally.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out")
    parser.add_argument("--tokenizer", action="store_true", help="also write a small byte-level tokenizer")
    parser.add_argument("--fp8", action="store_true", help="block-scaled FP8 checkpoint (DeepSeek-V3 / Qwen3-FP8 layout)")
    parser.add_argument("--block", type=int, default=16, help="FP8 block size (default 16)")
    for flag in ("hidden", "layers", "heads", "kv-heads", "vocab", "intermediate"):
        parser.add_argument(f"--{flag}", type=int)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k in ("hidden", "layers", "heads", "kv_heads", "vocab", "intermediate") and v is not None}
    path = build_tiny(args.kind, args.out, tokenizer=args.tokenizer, quantize="fp8" if args.fp8 else None,
                      block=args.block, **overrides)
    print(f"built {args.kind} in {path} (random weights: what it generates is meaningless)")


if __name__ == "__main__":
    main()
