"""A decoder's attention geometry, read once from its config: what a decode step's KV-cache
bytes (every format's roofline) and TensorRT-LLM's attention windows are computed from; a leaf.

From a Hugging Face config.json (the source checkpoint's, an AWQ directory's, a ModelOpt export's)
``head_dim`` is the config's own where it has one: Qwen3 and Gemma 2/3 set it apart from
``hidden_size / num_attention_heads``. From a GGUF header it is ``attention.key_length``, which
llama.cpp's converter writes for those families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# llama.cpp's own sliding-window layer pattern for architectures whose GGUF does not carry one
# (llama_model_load hparams: set_swa_pattern(n), every n-th layer global): Gemma 2 alternates,
# Gemma 3 has five sliding layers to one global
LLAMA_CPP_SWA_PATTERNS = {"gemma2": 2, "gemma3": 6}


@dataclass(frozen=True)
class Geometry:
    layers: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None        # None: every layer attends to the whole context
    sliding_layers: tuple[bool, ...] = ()    # per layer: whether it attends through the window

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "Geometry":
        """From a Hugging Face config (a multimodal one's text_config keys over its own)."""
        text = {**config, **(config.get("text_config") or {})}
        heads = int(text["num_attention_heads"])
        window, sliding = sliding_attention(text)
        return cls(layers=int(text["num_hidden_layers"]), kv_heads=int(text.get("num_key_value_heads") or heads),
                   head_dim=int(text.get("head_dim") or text["hidden_size"] // heads),
                   sliding_window=window, sliding_layers=sliding)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> "Geometry":
        """From a GGUF header's key/values (``runtimes.llama_cpp.read_header``), as llama.cpp reads them."""
        from gguf import Keys

        arch = metadata["general.architecture"]

        def value(key: str) -> Any:
            return metadata.get(key.format(arch=arch))

        layers = int(value(Keys.LLM.BLOCK_COUNT))
        heads = int(value(Keys.Attention.HEAD_COUNT))
        window = value(Keys.Attention.SLIDING_WINDOW)
        pattern = value(Keys.Attention.SLIDING_WINDOW_PATTERN)  # read_header steps over a per-layer array
        if not isinstance(pattern, int):
            pattern = LLAMA_CPP_SWA_PATTERNS.get(arch)
        sliding = tuple(index % pattern < pattern - 1 for index in range(layers)) if window and pattern else ()
        return cls(layers=layers, kv_heads=int(value(Keys.Attention.HEAD_COUNT_KV) or heads),
                   head_dim=int(value(Keys.Attention.KEY_LENGTH) or value(Keys.LLM.EMBEDDING_LENGTH) // heads),
                   sliding_window=int(window) if sliding else None, sliding_layers=sliding)

    def kv_cache_bytes(self, context_tokens: float, bytes_per_value: float = 2,
                       v_bytes_per_value: float | None = None) -> float:
        """Bytes of K and V one decode step reads at this context length, in the cache's own
        dtype (a V cache of another type: `v_bytes_per_value`): a sliding-window layer reads at
        most its window."""
        v_bytes = bytes_per_value if v_bytes_per_value is None else v_bytes_per_value
        per_token = self.kv_heads * self.head_dim * (bytes_per_value + v_bytes)
        if self.sliding_window is None:
            return self.layers * per_token * context_tokens
        return sum(per_token * (min(context_tokens, self.sliding_window) if sliding else context_tokens)
                   for sliding in self.sliding_layers)


def sliding_attention(config: dict[str, Any]) -> tuple[int | None, tuple[bool, ...]]:
    """(the sliding window, which layers attend through it) as transformers builds the model of a
    Hugging Face (text) config; (None, ()) where it has no window or turns it off."""
    window = config.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or config.get("use_sliding_window") is False:
        return None, ()
    model_type = str(config.get("model_type") or "")
    if config.get("layer_types"):
        return window, tuple(kind == "sliding_attention" for kind in config["layer_types"])
    layers = int(config.get("num_hidden_layers") or 1)
    if model_type == "gemma2":  # every other layer, from the first
        return window, tuple(index % 2 == 0 for index in range(layers))
    if model_type.startswith("gemma3"):  # all but every sliding_window_pattern-th
        pattern = int(config.get("sliding_window_pattern") or 6)
        return window, tuple((index + 1) % pattern != 0 for index in range(layers))
    if model_type.startswith("qwen2") and config.get("max_window_layers") is not None:
        return window, tuple(index >= int(config["max_window_layers"]) for index in range(layers))
    return window, (True,) * layers
