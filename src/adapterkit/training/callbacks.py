"""``transformers.Trainer`` callbacks.

A model with adapterkit adapters is still the user's ``transformers`` model, so ``Trainer`` trains
it unchanged: only parameters with ``requires_grad`` (the adapter and the head after
``ak.train_adapter``) get gradients and optimizer state. ``Trainer.save_model`` writes the whole
model (base, head and adapter tensors) as transformers does; :class:`SaveAdapterCallback` adds the
adapter alone, a few hundred kB, to each checkpoint and to the output folder at the end.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from adapterkit.core import io
from adapterkit.core import state as st


class SaveAdapterCallback(TrainerCallback):
    """Save adapter(s) ``names`` (default: all) with ``ak.save_adapter`` beside each Trainer checkpoint.

    Writes ``<output_dir>/checkpoint-<step>/adapter-<name>/`` on every save and
    ``<output_dir>/adapter-<name>/`` when training ends (rank 0 only under DDP).
    """

    def __init__(self, names: list[str] | None = None, with_head: bool = True) -> None:
        self.names, self.with_head = names, with_head

    def _save(self, model, folder: Path) -> None:
        names = self.names or list(st.get_state(model).configs)
        for name in names:
            io.save_adapter(model, name, folder / f"adapter-{name}", with_head=self.with_head)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir))
