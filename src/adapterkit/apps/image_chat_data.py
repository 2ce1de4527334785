"""Questions about images with checkable answers, for the image-chat demo (``adapterkit image-chat-demo``).

Three kinds, each answer one word:

* ``digit``: scikit-learn's bundled handwritten digits (real images; the vision demo's split), "Which digit
  is this?" -> ``"7"``;
* ``count``: synthetic scenes of 1 to 4 red circles among blue squares and green triangles, "How many red
  circles are there?" -> ``"3"``;
* ``word``: a synthetic picture of one word of :data:`WORDS` in a DejaVu font (Debian's fonts-dejavu-core),
  "What word is written?" -> ``"cat"``.

Scenes and words are drawn with Pillow from a seeded generator, so every split is the same on every machine.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from adapterkit.apps.vision_demo import digits

QUESTIONS = {
    "digit": "Which digit is this? Answer with the digit.",
    "count": "How many red circles are there? Answer with a number.",
    "word": "What word is written? Answer with the word.",
}
WORDS = ("cat", "dog", "sun", "tree", "fish", "bird", "moon", "star")
SIZE = 112  # pixels a side
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question about one image and its one-word answer."""

    image: object  # an RGB Pillow image
    kind: str
    answer: str

    @property
    def question(self) -> str:
        return QUESTIONS[self.kind]

    def messages(self, with_answer: bool = True) -> list[dict]:
        """The sample as a chat: a user turn of the image and the question (and the assistant's answer)."""
        user = {
            "role": "user",
            "content": [{"type": "image", "image": self.image}, {"type": "text", "text": self.question}],
        }
        return [user, {"role": "assistant", "content": self.answer}] if with_answer else [user]


def digit_samples(split: str) -> list[Sample]:
    """The vision demo's digits split (``train``, ``validation`` or ``test``), upsampled to :data:`SIZE`."""
    from PIL import Image

    images, labels = digits()[split]
    return [
        Sample(Image.fromarray(image).resize((SIZE, SIZE), Image.NEAREST).convert("RGB"), "digit", str(label))
        for image, label in zip(images, labels, strict=True)
    ]


def count_samples(n: int, seed: int) -> list[Sample]:
    """``n`` scenes, each 1 to 4 red circles and 0 to 3 other shapes, apart from one another."""
    rng = random.Random(seed)
    return [_scene(rng) for _ in range(n)]


def _scene(rng: random.Random) -> Sample:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    reds, others = rng.randint(1, 4), rng.randint(0, 3)
    for shape, (x, y, r) in zip(["circle"] * reds + ["other"] * others, _places(rng, reds + others), strict=True):
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(220, 30, 30))
        elif rng.random() < 0.5:
            draw.rectangle((x - r, y - r, x + r, y + r), fill=(30, 60, 220))
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=(30, 160, 60))
    return Sample(image, "count", str(reds))


def _places(rng: random.Random, k: int) -> list[tuple[int, int, int]]:
    """``k`` non-overlapping discs ``(x, y, radius)`` inside the image."""
    out: list[tuple[int, int, int]] = []
    while len(out) < k:
        r = rng.randint(8, 13)
        x, y = rng.randint(r + 2, SIZE - r - 3), rng.randint(r + 2, SIZE - r - 3)
        if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 4) ** 2 for a, b, c in out):
            out.append((x, y, r))
    return out


def word_samples(n: int, seed: int) -> list[Sample]:
    """``n`` pictures of one word each, in a random font, size, colour and place."""
    rng = random.Random(seed)
    return [_word(rng) for _ in range(n)]


def _word(rng: random.Random) -> Sample:
    from PIL import Image, ImageDraw, ImageFont

    word = rng.choice(WORDS)
    image = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(215, 255) for _ in range(3)))
    font = ImageFont.truetype(str(font_file(rng.choice(FONTS))), rng.randint(26, 34))
    left, top, right, bottom = font.getbbox(word)
    x = rng.randint(2, max(2, SIZE - (right - left) - 2)) - left
    y = rng.randint(2, max(2, SIZE - (bottom - top) - 2)) - top
    ImageDraw.Draw(image).text((x, y), word, font=font, fill=tuple(rng.randint(0, 90) for _ in range(3)))
    return Sample(image, "word", word)


def font_file(name: str) -> Path:
    """A DejaVu font file Debian ships (``fonts-dejavu-core``)."""
    for folder in FONT_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} not found in {FONT_DIRS}; install fonts-dejavu-core (apt-get install)")


def dataset(sizes: dict[str, int], seed: int = 0) -> dict[str, list[Sample]]:
    """Train and test samples of every kind: ``sizes`` per kind and split (``"train"``, ``"test"``); digits come
    from the digits' own train and test splits, scenes and words from disjoint seeds."""
    out = {}
    for k, (split, n) in enumerate(sizes.items()):
        mixed = digit_samples(split)[:n] + count_samples(n, seed + 2 * k) + word_samples(n, seed + 2 * k + 1)
        random.Random(seed + k).shuffle(mixed)
        out[split] = mixed
    return out


def exact_match(predicted: str, answer: str) -> bool:
    """The reply's first word, lower-cased without punctuation, is the answer."""
    words = predicted.strip().lower().replace(".", " ").replace(",", " ").split()
    return bool(words) and words[0] == answer.lower()
