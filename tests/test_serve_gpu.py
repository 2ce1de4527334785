"""The serving engine on CUDA: the same invariance as on the CPU (run where a GPU is present)."""

import pytest
import torch

import adapterkit as ak
from adapterkit.serve.engine import Engine, Sampling

from conftest import randomize_adapters
from test_chat import chat_llama, tokenizer
from test_serve_engine import assert_tokens_equal_generate, prompts, serve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_engine_on_cuda_equals_each_request_alone_and_generate():
    """A tiny Llama with LoRA, IA3 and bottleneck adapters on the GPU: a burst and a chunked long prompt give
    each request its bits alone; greedy tokens equal transformers' generate on the same device."""
    model = chat_llama(eos_token_id=None)
    for name, method in [("lora", "lora"), ("ia3", "ia3"), ("pfeiffer", "pfeiffer")]:
        ak.add_adapter(model, name, method)
    randomize_adapters(model, std=1.0)
    model = model.cuda()
    tok = tokenizer()
    tok.eos_token = None
    e = Engine(model, tok, max_batch=8, prefill_chunk=16)
    e.start()
    try:
        names = ["lora", "ia3", None, "pfeiffer", "lora", "ia3"]
        work = [(p * (8 if i == 0 else 1), a) for i, (p, a) in enumerate(zip(prompts(len(names)), names, strict=True))]
        alone = [serve(e, p, a, max_tokens=6)[:2] for p, a in work]
        streams = [e.submit(p, a, Sampling(max_tokens=6)) for p, a in work]
        assert [(s.result()[1] and s.tokens, s.logprobs) for s in streams] == alone
        assert_tokens_equal_generate(model, work, alone, device="cuda")
    finally:
        e.stop()
