"""Tiny random models built locally (no hub): the demo's embedded default, the tests' fixtures, the benchmarks.

    build_tiny("qwen3", out)  -> a 2-layer Qwen3 with tied embeddings, vocab 1001 (uneven at tp=2 and 3)

Kinds: llama, qwen3 (tied, q/k norm), mixtral (MoE, converted experts), qwen3_moe, phi3 (packed gate_up), opt,
and the sliding-window kinds gemma2 and gemma3 (`gemma3_text`): layer 0 slides over a 16-token window, layer 1
attends to everything (`sliding_window=`, `layer_types=` to change).
`heads=6, kv_heads=3` makes a model valid at tp=3. Weights are random but seeded, saved with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

# Sliding-window kinds: tpcli kind -> transformers model_type.
SLIDING_KINDS = {"gemma2": "gemma2", "gemma3": "gemma3_text"}
KINDS = ("llama", "qwen3", "mixtral", "qwen3_moe", "phi3", "opt", *SLIDING_KINDS)


def tiny_config(kind: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 1001,
                intermediate: int = 96, experts: int = 4, dtype: str = "float32", **extra):
    from transformers import AutoConfig

    head_dim = hidden // heads if hidden % heads == 0 else 16
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=vocab,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind in SLIDING_KINDS:
        cfg = _sliding_config(kind, common, kv_heads=kv_heads, intermediate=intermediate, head_dim=head_dim,
                              layers=layers, extra=extra)
    elif kind == "opt":
        cfg = AutoConfig.for_model("opt", ffn_dim=intermediate, word_embed_proj_dim=hidden, enable_bias=True, **common)
    else:
        common.update(num_key_value_heads=kv_heads, intermediate_size=intermediate)
        if kind in ("llama", "qwen3", "mixtral", "qwen3_moe"):
            common["head_dim"] = head_dim
        if kind == "qwen3":
            common.setdefault("tie_word_embeddings", True)
        if kind == "mixtral":
            common.update(num_local_experts=experts, num_experts_per_tok=2)
        if kind == "qwen3_moe":
            common.update(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=intermediate,
                          decoder_sparse_step=1, mlp_only_layers=[])
        cfg = AutoConfig.for_model(kind, **common)
    for key, value in extra.items():
        setattr(cfg, key, value)
    cfg.dtype = dtype
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


def build_tiny(kind: str, out: str | Path, *, seed: int = 0, max_shard_size: str | None = None,
               tokenizer: bool = False, **overrides) -> Path:
    """Build, randomly initialise and save a tiny model of `kind` into `out`; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(KINDS)}")
    cfg = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, cfg.dtype))
    with torch.no_grad():  # norms start at 1.0; perturb them so a wrong slice of them would show in the numerics
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if tokenizer:
        write_tokenizer(out, cfg.vocab_size)
    return out


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
    """python -m tpcli.tiny KIND OUT [--tokenizer] [--hidden N --layers N --heads N --kv-heads N --vocab N]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tpcli.tiny", description="Build a tiny random model locally.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out")
    parser.add_argument("--tokenizer", action="store_true", help="also write a small byte-level tokenizer")
    for flag in ("hidden", "layers", "heads", "kv-heads", "vocab", "intermediate"):
        parser.add_argument(f"--{flag}", type=int)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k in ("hidden", "layers", "heads", "kv_heads", "vocab", "intermediate") and v is not None}
    path = build_tiny(args.kind, args.out, tokenizer=args.tokenizer, **overrides)
    print(f"built {args.kind} in {path}")


if __name__ == "__main__":
    main()
