"""Does a checkpoint fit this run's text? Its context length and vocabulary, by name.

A language model's weights hold its block_size (the position table) and its
vocabulary (the token table) only as tensor shapes, so a shape mismatch names a
tensor where the user changed a setting; and a character vocabulary of the same
size but other characters fits every shape while each id means another
character. These checks say which setting differs, before any training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from trainer.data.tokenizers import vocabulary_difference
from trainer.errors import CheckpointError

# Sizes a model may expose as attributes (trainer.models.gpt.GPT does) and keep in
# the `model` section of the config a checkpoint stores.
_SIZES = {
    "block_size": "set data.block_size={saved} (the model's block_size follows it)",
    "vocab_size": "train on data with the checkpoint's vocabulary, or start from fresh weights",
}


def size_mismatch(saved_config: Mapping[str, Any] | None, model: nn.Module) -> str | None:
    """How the model of a checkpoint's run config differs from `model` in block_size or
    vocabulary size, with the fix; None when they agree or the sizes are not known."""
    saved = (saved_config or {}).get("model") or {}
    for key, fix in _SIZES.items():
        own = getattr(model, key, None)
        if isinstance(own, int) and isinstance(saved.get(key), int) and saved[key] != own:
            return (
                f"it was trained with model.{key}={saved[key]} and this run's model has "
                f"{key}={own}; {fix.format(saved=saved[key])}"
            )
    return None


def check_sizes_fit(state: Mapping[str, Any], model: nn.Module, source: str) -> None:
    """A checkpoint to continue from must have `model`'s block_size and vocabulary size."""
    why = size_mismatch(state.get("config"), model)
    if why:
        raise CheckpointError(f"{source} does not fit this model: {why}")


def check_vocabulary_fits(saved: Mapping[str, Any] | None, tokenizer: Any, source: str) -> None:
    """The weights of `source` were trained with the tokenizer state `saved`; this run's
    data tokenizes with `tokenizer`. Another vocabulary would silently remap every id."""
    if not saved or tokenizer is None or not hasattr(tokenizer, "state_dict"):
        return
    why = vocabulary_difference(saved, tokenizer.state_dict())
    if why:
        raise CheckpointError(
            f"{source} was trained with another vocabulary than this data's ({why}): its "
            "token ids would mean other tokens; train on text with the checkpoint's "
            "vocabulary, or start from fresh weights"
        )
