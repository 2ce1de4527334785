"""The routing signature an ``adapterkit train`` output gets from its training inputs."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from adapterkit.core.entries import CONFIG_FILE
from adapterkit.core.routing.files import save_signature
from adapterkit.core.routing.inputs import Prompt, routing_text
from adapterkit.core.routing.signatures import MIN_SAMPLES, Signature, signature
from adapterkit.errors import AdapterError


def sign_training_output(
    model: nn.Module, tokenizer, inputs: Sequence[Any], folder: str | os.PathLike, **options: Any
) -> Signature | None:
    """Compute and save into ``folder`` the signature of a training set's inputs (its text column: strings,
    word lists, conversations or conversations as JSON strings, as ``adapterkit train`` reads them), for
    ``adapterkit train`` to call after saving the adapter. Returns None, writing nothing, where ``folder``
    holds no adapter (a full fine-tune), for inputs that are not text (speech) or fewer than a signature
    needs."""
    if not (Path(folder) / CONFIG_FILE).is_file() or not callable(tokenizer) or len(inputs) < MIN_SAMPLES:
        return None
    try:
        prompts = [_training_prompt(value) for value in inputs]
    except AdapterError:
        return None
    sig = signature(model, tokenizer, prompts, **options)
    save_signature(folder, sig)
    return sig


def _training_prompt(value: Any) -> Prompt:
    """A training row's text column as routing sees it: a JSON list of messages (a CSV cell) decoded."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(ValueError):
            decoded = json.loads(value)
            if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded):
                value = decoded
    routing_text(value)  # raises for what routing cannot read
    return value
