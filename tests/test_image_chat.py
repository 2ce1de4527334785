"""Image-to-LLM adapters (ak.ImageConfig): the projector writes the image positions, in generate, training,
save/load, per-row batches and the server; hostile images are clear errors."""

import base64
import io
import json

import numpy as np
import openai
import pytest
import requests
import torch
import transformers as T

import adapterkit as ak
from adapterkit.core import images
from adapterkit.core.images import ImageError

PNG_SIZE = 20


@pytest.fixture(scope="module")
def tokenizer():
    from adapterkit.apps.models import smollm2

    tok = T.AutoTokenizer.from_pretrained(smollm2())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """A tiny random DINOv2 (32 px, patch 8: a 4 x 4 grid, pooled 2 x 2 to 4 positions an image)."""
    folder = tmp_path_factory.mktemp("vision") / "dino"
    torch.manual_seed(0)
    config = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    T.Dinov2Model(config).save_pretrained(folder)
    T.BitImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(folder)
    return str(folder)


def tiny_lm(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37
    )
    config = T.LlamaConfig(**sizes, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return T.LlamaForCausalLM(config).eval()


def image_adapter(tokenizer, vision) -> ak.UnionConfig:
    image = ak.ImageConfig(encoder=vision, features=32, image_size=32, patch=8, pool=2,
                           image_token_id=ak.image_token(tokenizer))  # fmt: skip
    return ak.union(image, ak.LoRAConfig(r=4))


def randomize(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".{name}." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def picture(seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (PNG_SIZE, PNG_SIZE, 3), dtype=np.uint8))


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def ask(image, text: str = "Which digit is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def model(tokenizer, vision):
    lm = tiny_lm(tokenizer)
    for k, name in enumerate(["see", "look"]):
        ak.add_adapter(lm, name, image_adapter(tokenizer, vision))
        randomize(lm, name, seed=k)
    return lm


def test_image_token_is_a_spare_special_token(tokenizer):
    token = ak.image_token(tokenizer)
    assert tokenizer.convert_ids_to_tokens(token) == "<empty_output>"
    assert token not in (tokenizer.eos_token_id, tokenizer.bos_token_id)


def test_the_projector_replaces_exactly_the_image_positions(model, tokenizer, vision):
    """A forward with the image fed equals the LLM on embeddings whose image rows are the projected features."""
    from adapterkit.core.generation import _encode, _with_images

    ak.set_active(model, "see")
    prompts, feed, token = _with_images(model, tokenizer, [ask(picture(1))], None, None)
    batch = _encode(tokenizer, prompts, chat=True)
    where = batch["input_ids"] == token
    assert int(where.sum()) == 4  # one image, 2 x 2 pooled positions
    with torch.no_grad(), feed:
        fed = model(**batch).logits
    features = images.encoder(vision, 32, 2)([picture(1)]).reshape(-1, 32)
    projector = next(m for n, m in model.named_modules() if n.endswith(".see") and hasattr(m, "project"))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        embeds[where] = projector.project(features)
        by_hand = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        plain = model(**batch).logits  # nothing fed: the reserved token's own embedding
    torch.testing.assert_close(fed, by_hand, rtol=0, atol=0)
    assert (fed - plain).abs().max() > 1e-3


def test_generate_batches_images_with_text_and_per_row_adapters(model, tokenizer):
    """Each row of a mixed batch (image prompts of two adapters, a text prompt) answers as it does alone."""
    prompts = [ask(picture(2)), "hello there", ask(picture(3), "How many?")]
    adapters = ["see", "see", "look"]
    together = ak.generate(model, tokenizer, prompts, per_prompt=adapters, max_tokens=5)
    alone = [
        ak.generate(model, tokenizer, [p], per_prompt=[a], max_tokens=5)[0]
        for p, a in zip(prompts, adapters, strict=True)
    ]
    assert together == alone
    ak.set_active(model, "look")
    assert ak.generate(model, tokenizer, [prompts[2]], max_tokens=5) == [alone[2]]


def test_mismatched_images_and_tokens_are_clear_errors(model, tokenizer):
    ak.set_active(model, "see")
    with pytest.raises(ImageError, match="reserved"):  # the text writes the reserved token itself
        ak.generate(model, tokenizer, [ask(picture(1), "<empty_output> hi")], max_tokens=2)
    ak.set_active(model, None)
    with pytest.raises(ImageError, match="one active image adapter"):
        ak.generate(model, tokenizer, [ask(picture(1))], max_tokens=2)
    with pytest.raises(ImageError, match="data: URLs"):
        images.part_image({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})


def test_save_load_and_delete_without_a_trace(model, tokenizer, vision, tmp_path):
    ak.set_active(model, "see")
    prompt = [ask(picture(5))]
    before = ak.generate(model, tokenizer, prompt, max_tokens=6)
    ak.save_adapter(model, "see", tmp_path / "see")
    fresh = tiny_lm(tokenizer)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    ak.load_adapter(fresh, str(tmp_path / "see"), name="see")
    ak.set_active(fresh, "see")
    assert ak.generate(fresh, tokenizer, prompt, max_tokens=6) == before
    ak.delete_adapter(fresh, "see")
    after = fresh.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_train_image_chat_from_the_cli_learns_the_answers(tokenizer, vision, tmp_path):
    """``adapterkit train --task image-chat``: two images (files beside the data), two answers, memorised."""
    from adapterkit.apps.cli import main

    lm = tiny_lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    (tmp_path / "a.png").write_bytes(png(picture(10)))
    (tmp_path / "b.png").write_bytes(png(picture(11)))
    pairs = [("a.png", "seven"), ("b.png", "three")] * 8
    rows = [{"messages": [*ask(image), {"role": "assistant", "content": answer}]} for image, answer in pairs]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["train", "--model", str(tmp_path / "lm"), "--data", str(tmp_path / "train.jsonl"), "--task", "image-chat",
          "--vision-encoder", vision, "--image-size", "32", "--adapter", "lora", "--lr", "2e-2", "--epochs", "25",
          "--batch-size", "8", "--output", str(tmp_path / "run"), "--save-steps", "1000"])  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = [loss for _, loss in metrics["history"]["loss"]]
    assert losses[-1] < 0.2 * losses[0]
    fresh = tiny_lm(tokenizer)
    ak.load_adapter(fresh, str(tmp_path / "run" / "adapter"), name="task")
    ak.set_active(fresh, "task")
    replies = ak.generate(fresh, tokenizer, [ask(picture(10)), ask(picture(11))], max_tokens=3)
    assert [r.split()[0] for r in replies] == ["seven", "three"]  # the answer comes from the image alone


# -- serving ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model, tokenizer, tmp_path_factory):
    from adapterkit.serve.launch import Options, build

    from serve_fakes import Running

    root = tmp_path_factory.mktemp("served")
    base = tiny_lm(tokenizer)
    base.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    for name in ("see", "look"):
        ak.save_adapter(model, name, root / name)
    server = Running(build(str(root / "lm"), Options(adapters={n: str(root / n) for n in ("see", "look")})))
    yield server
    server.stop()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def openai_ask(image_url: str, text: str = "Which digit is this?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def test_served_images_answer_as_generate_does(served, model, tokenizer):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    for name, seed in [("see", 20), ("look", 21)]:
        image = picture(seed)
        reply = client.chat.completions.create(
            model=name, messages=openai_ask(data_url(png(image))), max_tokens=6, temperature=0
        )
        ak.set_active(model, name)
        assert reply.choices[0].message.content == ak.generate(model, tokenizer, [ask(image)], max_tokens=6)[0]


def hostile_images() -> dict[str, str]:
    from PIL import Image

    good = png(picture(1))
    out = io.BytesIO()
    Image.new("L", (5000, 5000)).save(out, format="PNG")  # 25 M pixels, a few kB: a decompression bomb
    return {
        "truncated": data_url(good[: len(good) // 2]),
        "huge": data_url(out.getvalue()),
        "wrong type": data_url(b"%PDF-1.4 not a picture"),
        "polyglot": data_url(b"GIF89a" + b"\x00" * 10 + b"<script>alert(1)</script>"),
        "not base64": "data:image/png;base64,@@@",
        "remote": "https://example.com/a.png",
        "svg": data_url(b"<svg/>", "image/svg+xml"),
    }


@pytest.mark.parametrize("kind", list(hostile_images()))
def test_hostile_images_are_a_4xx_with_a_reason(served, kind):
    body = {"model": "see", "messages": openai_ask(hostile_images()[kind]), "max_tokens": 2}
    reply = requests.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["error"]["message"]


def test_images_to_the_base_model_or_too_many_are_refused(served):
    url = data_url(png(picture(1)))
    for model, count in [("lm", 1), ("see", 9)]:
        parts = [{"type": "image_url", "image_url": {"url": url}}] * count
        body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
        reply = requests.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 400, reply.text
