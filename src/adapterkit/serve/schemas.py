"""The request bodies of ``adapterkit serve``, as pydantic models: OpenAI's fields (those that fit a
server of one model and its adapters), validated on arrival and published in the OpenAPI schema.

A field OpenAI defines but this server does not implement is refused by name (a client that asks for
``logprobs`` gets a 400 saying so, not an answer without them); ``n`` and the penalties take their
neutral value only.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_TEXT = 2**20  # characters of one prompt, message or input (the body cap is the real bound)
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_IMAGE_URL = 2**22  # characters of one image's data: URL (3 MiB of image file)

Text = Annotated[str, Field(max_length=MAX_TEXT)]
Stop = Annotated[str, Field(min_length=1, max_length=200)]
Name = Annotated[str, Field(min_length=1, max_length=300)]
Neutral = Annotated[float, Field(ge=0, le=0)]  # frequency/presence penalties: accepted at 0 only


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: StrictBool = False


class Sampled(Body):
    """What every generation request shares: the model (or adapter) and the sampling options."""

    model: Name
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    frequency_penalty: Neutral = 0.0
    presence_penalty: Neutral = 0.0
    user: Annotated[str, Field(max_length=256)] | None = None

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class Completion(Sampled):
    """``POST /v1/completions``: one prompt, or several (one choice each)."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=32)]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Part(Body):
    """A text part of a message's content."""

    type: Literal["text"]
    text: Text


class ImageUrl(Body):
    url: Annotated[str, Field(max_length=MAX_IMAGE_URL)]  # data:image/png;base64,... only (nothing is fetched)
    detail: Literal["auto", "low", "high"] = "auto"  # accepted; every image is seen at the adapter's size


class ImagePart(Body):
    """An image part of a message's content, for an image adapter (``ak.ImageConfig``)."""

    type: Literal["image_url"]
    image_url: ImageUrl


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[Part | ImagePart], Field(min_length=1, max_length=64)]
    name: Annotated[str, Field(max_length=64)] | None = None

    def text(self) -> str:
        """The content's text (image parts left out)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, Part))

    def parts(self) -> str | list[dict]:
        """The content as :mod:`adapterkit.core.images` reads it."""
        return self.content if isinstance(self.content, str) else [p.model_dump() for p in self.content]

    def images(self) -> int:
        return 0 if isinstance(self.content, str) else sum(isinstance(p, ImagePart) for p in self.content)


class Chat(Sampled):
    """``POST /v1/chat/completions``: a conversation through the tokenizer's chat template."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # the newer name of max_tokens


class Inputs(Body):
    """``POST /v1/embeddings`` and ``POST /v1/classify``: texts for an encoder and its adapter."""

    model: Name
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=256)]
    user: Annotated[str, Field(max_length=256)] | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embeddings(Inputs):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None  # not supported: the hidden size is the size


class Classify(Inputs):
    pass


class NewAdapter(Body):
    """``POST /admin/adapters``: serve ``source`` (a folder on the server, or ``hub:owner/name@tag``) as ``name``."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
    source: Annotated[str, Field(min_length=1, max_length=4096)]


BODIES = (Completion, Chat, Embeddings, Classify, NewAdapter)
