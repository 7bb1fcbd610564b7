"""Tiny random models and a tiny real tokenizer for tests (no downloads).

Used by the core's and the plugins' tests; importable as ``decodekit.testing``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

# A few frequent English pieces so multi-character tokens (and overlapping spellings) exist.
_MERGE_WORDS = ["the", "and", "ing", "ion", "he", "th", "in", "er", "an", "re", "on", "at", "en", "ed", "is", "it",
                "ou", "or", "es", "te", "of", "to", "ar", "st", "nd", "al", "ha", "ng", "as", "se"]


@lru_cache(maxsize=None)
def tiny_tokenizer() -> Any:
    """A real ``PreTrainedTokenizerFast``: byte-level BPE with 256 byte tokens, a few merges and
    ``<pad>``, ``<s>``, ``</s>`` specials (vocab ~300)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    byte_tokens.sort()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for t in byte_tokens:
        vocab[t] = len(vocab)
    merges = []
    for w in _MERGE_WORDS:
        # merge left to right: "the" = ("t","h") -> "th", ("th","e") -> "the"
        cur = w[0]
        for ch in w[1:]:
            pair = (cur, ch)
            if pair not in merges:
                merges.append(pair)
            cur = cur + ch
            vocab.setdefault(cur, len(vocab))
        spaced = "Ġ" + w
        cur = "Ġ"
        for ch in w:
            pair = (cur, ch)
            if pair not in merges:
                merges.append(pair)
            cur = cur + ch
            vocab.setdefault(cur, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return fast


def tiny_config(arch: str = "llama", vocab_size: int | None = None, **overrides: Any) -> Any:
    """Config of a tiny random model: ``llama`` (GQA), ``mistral`` (sliding window) or ``gemma3``
    (hybrid sliding/full layers, MQA)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig

    V = vocab_size or len(tiny_tokenizer())
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, **common)
    elif arch == "mistral":
        cfg = MistralConfig(num_hidden_layers=2, sliding_window=8, **common)
    elif arch == "gemma3":
        common.update(num_key_value_heads=1, head_dim=16)
        cfg = Gemma3TextConfig(num_hidden_layers=3, sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: llama, mistral or gemma3")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A tiny random causal LM in eval mode (deterministic for a seed).

    Random weights give near-uniform logits; the output projection is scaled up so greedy
    decoding has clear winners (ties would make token-identity comparisons flaky)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model.eval()


def hf_greedy(model: Any, tokenizer: Any, prompts: list[str], n: int) -> list[list[int]]:
    """Oracle: transformers' own greedy ``generate`` (left padding), exactly ``n`` new tokens per row."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, enc.input_ids.shape[1]:].tolist()


def hf_dynamic_cache_component() -> Any:
    """A minimal cache component around transformers' ``DynamicCache`` (cropped to the slot count,
    full layers everywhere), so the core can be tested without the kvcache plugin."""
    from transformers import DynamicCache

    from decodekit.components import Cache

    class HFDynamic(Cache):
        def setup(self, state: Any) -> None:
            super().setup(state)
            # No config: full (non-sliding) layers for every model. transformers' sliding layers keep
            # only the window, which a rollback may need to reach past; the window itself is
            # enforced by the attention mask (decodekit.components.slot_attention_mask).
            self._pkv = DynamicCache()

        def past_key_values(self) -> Any:
            return self._pkv

        def cache_update(self, state: Any) -> None:
            extra = self._pkv.get_seq_length() - state.n_slots
            if extra > 0:
                self._pkv.crop(-extra)
            self._seen = min(self._seen, state.n_slots)

    return HFDynamic
