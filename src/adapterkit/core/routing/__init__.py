"""Routing: pick the adapter for each input from the input alone (issue 26, items 1 and 2).

Each adapter carries a *routing signature*: what the frozen base model (adapters disabled) makes of a
sample of the adapter's inputs (:mod:`.inputs`: one hidden layer, mean-pooled), as a Gaussian with its
calibration (:mod:`.signatures`), stored beside the adapter and read as hostile (:mod:`.files`). An
input's score for an adapter is its Mahalanobis distance (over sqrt(D)) divided by the 95th percentile of
the calibration distances, so 1 means "as far as the farthest 5% of the adapter's own inputs".

:class:`Router` (:mod:`.router`) sends an input to the adapter of lowest score, or to the base model
(``None``) when every score is above a threshold; ``weights`` gives top-k mixing weights and ``setups``
per-row setups for ``PerRow`` (``ak.generate(..., route=router)``). An ``adapterkit train`` output is
signed from its training inputs (:mod:`.training`).
"""

from __future__ import annotations

from adapterkit.core.routing.files import SIGNATURE_FILE, SIGNATURE_JSON, has_signature, load_signature, save_signature
from adapterkit.core.routing.inputs import Prompt, features, routing_text
from adapterkit.core.routing.router import Calibration, Router, RouterConfig, choose_threshold, saved_adapter
from adapterkit.core.routing.signatures import TENSORS, Signature, base_identity, signature
from adapterkit.core.routing.training import sign_training_output

__all__ = [
    "SIGNATURE_FILE",
    "SIGNATURE_JSON",
    "TENSORS",
    "Calibration",
    "Prompt",
    "Router",
    "RouterConfig",
    "Signature",
    "base_identity",
    "choose_threshold",
    "features",
    "has_signature",
    "load_signature",
    "routing_text",
    "save_signature",
    "saved_adapter",
    "sign_training_output",
    "signature",
]
