"""AdapterHub's ``Average`` scales by an extra 1/N: a check, run in its venv.

    benchmarks/.venvs/adapters/bin/python benchmarks/peer_average_check.py

Two LoRA adapters on a tiny BERT's query projection: with ``Average("a", "b")`` (default weights
1/2 each) adapters 1.3.0 returns ``y0 + (da + db) / 4`` (``torch.mean`` over the weighted stack),
where the weighted average is ``y0 + (da + db) / 2``. adapterkit's ``Average`` returns the latter.
"""

import adapters
import torch
import transformers as T
from adapters import LoRAConfig
from adapters.composition import Average

torch.manual_seed(0)
config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=100)
model = T.BertModel(config).eval()
adapters.init(model)
for name in "ab":
    lora = LoRAConfig(r=2, alpha=2, selfattn_lora=True, intermediate_lora=False, output_lora=False, attn_matrices=["q"])
    model.add_adapter(name, lora)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for key, p in model.named_parameters():
        if "loras" in key:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
query = model.encoder.layer[0].attention.self.query
x = torch.randn(1, 5, 32, generator=g)


def site(setup):
    model.set_active_adapters(setup)
    with torch.no_grad():
        return query(x)


y0 = site(None)
da, db, average = site("a") - y0, site("b") - y0, site(Average("a", "b")) - y0
print(f"|Average - (da + db) / 4| = {(average - (da + db) / 4).abs().max():.2e}")
print(f"|Average - (da + db) / 2| = {(average - (da + db) / 2).abs().max():.2e}")
