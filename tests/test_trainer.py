"""``transformers.Trainer`` on a model with an adapter, unchanged, and ``ak.callbacks.SaveAdapterCallback``."""

import torch
import transformers as T
from safetensors.torch import load_file

import adapterkit as ak

from conftest import make_model


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 100, (n, 6), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_trains_only_adapter_and_head_and_the_callback_saves_them(tmp_path):
    model = make_model("bert").train()
    ak.add_adapter(model, "task", "lora")
    ak.train_adapter(model, "task")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = T.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        save_steps=2, report_to=[], use_cpu=True, logging_steps=100,
    )  # fmt: skip
    trainer = T.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[ak.callbacks.SaveAdapterCallback()])
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and any(".lora_A" in k for k in changed) and "classifier.weight" in changed
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}

    for folder in (tmp_path / "checkpoint-2" / "adapter-task", tmp_path / "checkpoint-4" / "adapter-task"):
        assert (folder / "adapter.safetensors").is_file() and (folder / "head.safetensors").is_file()
    fresh = make_model("bert")  # the same frozen base; adapter and head come from the callback's folder
    ak.load_adapter(fresh, tmp_path / "adapter-task", activate=True)
    x = Rows().ids[:4]
    assert torch.equal(model.eval()(x).logits, fresh(x).logits)
    with ak.disable_adapters(fresh):
        assert not torch.allclose(model(x).logits, fresh(x).logits, atol=1e-4)
    # Trainer.save_model writes the whole transformers model with the adapter tensors beside the base.
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert {k for k in saved if ".lora_" in k} == {k for k in trainable if ".lora_" in k}
