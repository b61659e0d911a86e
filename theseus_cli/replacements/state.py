"""Recurrent state for sequence replacements, kept in transformers' cache during generation.

A converted decoder generates the way its guide did: ``model.generate(..., use_cache=True)`` feeds one new token
per step and hands every attention module the model's cache (``cache`` from transformers 5.24 on,
``past_key_values`` before). A replaced module cannot store
keys and values there — it has none — so it takes its own slot of that cache (its guide module's ``layer_idx``)
and puts a :class:`RecurrentSlot` in it: the module's state after the tokens seen so far (an Elman RNN's hidden
states, linear attention's running sums; nothing for a token MLP) and how many tokens that is. The model reads
that count where it would read the number of cached keys (position ids, mask sizes), so kept attention layers in
a partial conversion keep their normal key–value cache beside it.

Why a slot of the model's own cache and not a cache class of ours: ``generate`` and the model's forward create
the cache themselves (a ``DynamicCache`` built from the config); a user's generation code never has to know
that the model was converted. The slot is taken the first time the module sees that cache, while it is empty.

Limits, each a clear error rather than a wrong answer: a replaced module whose guide module had no ``layer_idx``
cannot find its slot; a state cannot be rewound (``crop``, used by assisted generation); beam search reorders it
like keys (``reorder_cache``).
"""

from __future__ import annotations

import functools
import inspect

import torch

# the keyword an attention module gets the cache by: transformers 5.24 renamed ``past_key_values`` to ``cache``
# (the old name is deprecated there, to be removed in 5.40); older releases and other models use the rest
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward takes a cache by: ``cache`` on transformers >= 5.24, else ``past_key_values``
    (passing the old name to a new release works but warns once per call, and stops working in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output):
    """The cache a transformers model returned (``output.cache`` on >= 5.24, ``output.past_key_values`` before)."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


class StreamingError(RuntimeError):
    """A replaced module was handed a cache it cannot keep its state in."""


class RecurrentSlot:
    """One replaced module's state in a transformers cache: batch-first tensors and the tokens they summarise.

    Mixed in before transformers' ``DynamicLayer`` (:func:`recurrent_layer_class`), so that every cache operation
    transformers calls on a layer exists; the keys and values it would hold stay empty."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.state: tuple[torch.Tensor, ...] | None = None
        self.seen = 0

    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise StreamingError("a replaced module's cache slot holds a recurrent state, not keys and values")

    def store(self, state: tuple[torch.Tensor, ...], tokens: int) -> None:
        self.state, self.seen = state, self.seen + tokens
        self.is_initialized = True

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        # an int, a cache_position tensor (older transformers), or a 0-d tensor while tracing an export
        tokens = query.shape[0] if isinstance(query, torch.Tensor) and query.dim() else int(query)
        return self.seen + tokens, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized = None, 0, False

    def _each(self, fn) -> None:
        if self.state is not None:
            self.state = tuple(fn(s) for s in self.state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each(lambda s: s[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise StreamingError("a recurrent state cannot be rewound (crop): assisted or speculative decoding "
                                 "needs a key-value cache; generate without an assistant model")

    def offload(self) -> None:
        self._each(lambda s: s.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass


@functools.cache
def recurrent_layer_class() -> type:
    """The cache layer class (:class:`RecurrentSlot` over ``DynamicLayer``), made on first use: importing
    transformers costs a second or two that a CLI call without a decoder should not pay."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        raise StreamingError("streaming a converted decoder needs transformers >= 4.56 (per-layer caches); "
                             "generate with use_cache=False") from None
    return type("RecurrentLayer", (RecurrentSlot, DynamicLayer), {"__module__": __name__})


def cache_of(kwargs: dict):
    """The cache an attention module was handed, if any (the self-attention half of an encoder–decoder cache)."""
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None:
        return None
    if not hasattr(cache, "layers"):  # not a transformers Cache (a legacy tuple, a placeholder): ignored, as before
        return None
    return getattr(cache, "self_attention_cache", cache)


def state_slot(kwargs: dict, layer_idx: int | None, owner: str):
    """The :class:`RecurrentSlot` this module keeps its state in, taking the slot if it is still empty; None when
    no cache was passed (training, evaluation, ``use_cache=False``)."""
    cache = cache_of(kwargs)
    if cache is None:
        return None
    if layer_idx is None:
        raise StreamingError(f"{owner} was handed a cache but does not know its layer index (its guide module had "
                             "no layer_idx); generate with use_cache=False")
    recurrent, layers = recurrent_layer_class(), cache.layers
    while len(layers) <= layer_idx:
        layers.append(recurrent.__bases__[1]())  # an empty DynamicLayer, as the cache itself would add
    slot = layers[layer_idx]
    if isinstance(slot, RecurrentSlot):
        return slot
    if slot.is_initialized and slot.get_seq_length() > 0:
        raise StreamingError(f"{owner}: cache slot {layer_idx} already holds keys and values of "
                             f"{slot.get_seq_length()} tokens (a cache filled by another model?)")
    layers[layer_idx] = recurrent()
    return layers[layer_idx]


def first_call(slot) -> bool:
    """True when a module runs without a state to continue (no cache, or the prompt's first forward)."""
    return slot is None or slot.state is None


def guide_layer_idx(old) -> int | None:
    """The cache slot of the module being replaced: transformers' attention modules carry it as ``layer_idx``."""
    for module in old.modules():
        value = getattr(module, "layer_idx", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
