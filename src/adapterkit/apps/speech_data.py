"""Speech data synthesised offline with espeak-ng and sox, deterministic by seed, cached.

Speakers are espeak-ng voices x voice variants x pitch offsets (7 x 8 x 3 = 168), split 60/20/20
into training, validation and test speakers: choices are made on voices the model never heard,
and reported on others it never heard either. Each utterance is synthesised at 22.05 kHz,
resampled by sox to 16 kHz mono, and mixed with white noise at a seeded SNR between 10 and 30 dB.
Four tasks:

* ``"asr"``: fast, noisy commands naming people Whisper has never heard of (:data:`NAMES`) and a
  number or a day: a domain vocabulary an adapter has to learn (WER on held-out speakers);
* ``"intent"``: spoken commands, several paraphrases per intent (8 classes);
* ``"emotion"``: prosody styles (4 classes: neutral, excited, sad, angry as rate / pitch /
  amplitude patterns) on neutral sentences;
* ``"speaker"``: speaker identity (training: the training speakers as classes; testing: a trial
  list of same / different held-out speaker pairs, :func:`trials`).

Arrays are cached under ``$ADAPTERKIT_CACHE/speech`` (default ``~/.cache/adapterkit``) as ``.npz``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from adapterkit.errors import AdapterError
from adapterkit.files import atomic_file, cache_dir

VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m3", "m5", "m7", "f1", "f2", "f3", "f5")
PITCHES = (35, 50, 65)
SPLITS = {"train": 0.6, "validation": 0.2, "test": 0.2}
# Made-up names: no spelling of them is in Whisper's training data, so the untouched model writes
# something else. Commands name one of them and a number or a day, spoken fast (STYLES["fast"]) in
# noise. The 570 commands are split like the speakers, so no test sentence was heard in training.
NAMES = ("zorvath", "quellin", "brasko", "ymira", "kelthane", "drusil", "obrenna", "vashkar", "tolmeck", "ferrandi")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
COMMANDS = (  # {0}: a name, {1}: a number, {2}: a day
    "call {0} at {1}",
    "send {1} files to {0}",
    "{0} will meet us on {2}",
    "ask {0} about {2}",
    "tell {0} to wait {1} minutes",
    "is {0} free on {2}",
)
SENTENCES = (
    "the cat sat on the mat",
    "open the door",
    "i like green tea",
    "the sun is hot today",
    "we walk to the park",
    "she reads a good book",
    "the dog runs fast",
    "my car is red",
    "it is time to go home",
    "he plays the old piano",
    "the bird can sing",
    "please close the window",
    "the milk is cold",
    "they eat fish for lunch",
    "a big ship sails at night",
    "we met at the station",
)
INTENTS = {
    "lights_on": ("turn on the light", "switch the lights on", "lights on please", "make it bright"),
    "lights_off": ("turn off the light", "switch the lights off", "lights off please", "make it dark"),
    "music_play": ("play some music", "start the music", "put on a song", "i want to hear music"),
    "music_stop": ("stop the music", "pause the song", "no more music", "turn the music off"),
    "weather": ("what is the weather", "will it rain today", "is it sunny outside", "tell me the forecast"),
    "time": ("what time is it", "tell me the time", "how late is it", "what is the hour"),
    "volume_up": ("turn it up", "louder please", "increase the volume", "raise the sound"),
    "volume_down": ("turn it down", "quieter please", "decrease the volume", "lower the sound"),
}
STYLES = {  # rate (words per minute), pitch offset, amplitude
    "neutral": (160, 0, 100),
    "excited": (210, 20, 160),
    "sad": (110, -15, 60),
    "angry": (190, 5, 190),
    "fast": (240, 0, 100),
}


@dataclasses.dataclass(frozen=True)
class Speaker:
    voice: str
    variant: str
    pitch: int

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant}@{self.pitch}"


def speakers(seed: int = 0) -> dict[str, list[Speaker]]:
    """All voice x variant x pitch speakers, split into disjoint ``train``, ``validation`` and ``test``."""
    return _split([Speaker(*combo) for combo in itertools.product(VOICES, VARIANTS, PITCHES)], seed)


def commands(seed: int = 0) -> dict[str, list[str]]:
    """Every command with every name, number and day, split into disjoint ``train``, ``validation``, ``test``."""
    every = sorted({c.format(n, k, d) for c in COMMANDS for n in NAMES for k in NUMBERS for d in DAYS})
    return _split(every, seed)


def _split(things: list, seed: int) -> dict[str, list]:
    things = list(things)
    random.Random(seed).shuffle(things)
    bounds = [0, *(round(share * len(things)) for share in itertools.accumulate(SPLITS.values()))]
    return {name: things[a:b] for name, a, b in zip(SPLITS, bounds, bounds[1:], strict=False)}


def check_tools() -> None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise AdapterError(
            f"{' and '.join(missing)} not found: the speech data is synthesised with them; "
            "run bash scripts/setup.sh as root or sudo apt-get install espeak-ng sox"
        )


def synthesise(text: str, speaker: Speaker, style: str = "neutral", snr_db: float = 20.0, seed: int = 0) -> np.ndarray:
    """One utterance: float32 samples at 16 kHz, with white noise at ``snr_db``."""
    rate, pitch_shift, amplitude = STYLES[style]
    pitch = min(99, max(0, speaker.pitch + pitch_shift))
    with tempfile.TemporaryDirectory() as tmp:
        raw, wav = Path(tmp) / "raw.wav", Path(tmp) / "16k.wav"
        voice = ["-v", f"{speaker.voice}+{speaker.variant}", "-p", str(pitch), "-s", str(rate), "-a", str(amplitude)]
        subprocess.run(["espeak-ng", *voice, "-w", str(raw), text], check=True, capture_output=True)
        sox = ["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)]  # -D: no dither, repeatable
        subprocess.run(sox, check=True, capture_output=True)
        with wave.open(str(wav)) as w:
            audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    noise = np.random.default_rng(seed).standard_normal(audio.shape).astype(np.float32)
    scale = np.sqrt(np.mean(audio**2) / (10 ** (snr_db / 10))) if audio.size else 0.0
    return audio + scale * noise


def items(task: str, split: str, seed: int = 0) -> list[tuple[str, Speaker, str, str]]:
    """``(text, speaker, style, label)`` of one task and split (no audio yet)."""
    people = speakers(seed)[split]
    if task == "asr":  # six sentences per speaker, from the split's own sentences
        rng, sentences = random.Random(f"{seed}-asr-{split}"), commands(seed)[split]
        return [(text, s, "fast", text) for s in people for text in rng.sample(sentences, 6)]
    if task == "intent":
        return [(p, s, "neutral", i) for s in people for i, ps in INTENTS.items() for p in ps[:2]]
    if task == "emotion":
        return [(t, s, style, style) for s in people for style in STYLES for t in SENTENCES[8:10]]
    if task == "speaker":
        return [(t, s, "neutral", s.name) for s in people for t in SENTENCES[8:14]]
    raise AdapterError(f"unknown speech task {task!r}; choose asr, intent, emotion or speaker")


def load(task: str, split: str, seed: int = 0, limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Audio and labels of one task and split, synthesised once and cached."""
    chosen = items(task, split, seed)
    chosen = random.Random(seed).sample(chosen, limit) if limit and limit < len(chosen) else chosen
    spec = [task, split, seed, limit, VOICES, VARIANTS, PITCHES, SPLITS, NAMES, NUMBERS, DAYS, COMMANDS, STYLES]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    path = cache_dir() / "speech" / f"{task}-{split}-{key}.npz"
    if path.exists():
        data = np.load(path)
        return [data[f"a{i}"] for i in range(len(chosen))], [label for *_, label in chosen]
    check_tools()
    rng = random.Random(f"{seed}-{task}-{split}")
    audio = [synthesise(text, s, style, rng.uniform(10, 30), rng.randrange(2**31)) for text, s, style, _ in chosen]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:  # whole or not at all
        np.savez(f, **{f"a{i}": a for i, a in enumerate(audio)})
    return audio, [label for *_, label in chosen]


def trials(labels: list[str], seed: int = 0, per_utterance: int = 4) -> list[tuple[int, int, bool]]:
    """Verification trials ``(i, j, same speaker)`` over utterances with speaker ``labels``: for
    each utterance, ``per_utterance`` partners, half of its speaker and half of others."""
    rng = random.Random(seed)
    by_speaker: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        by_speaker.setdefault(name, []).append(i)
    out = []
    for i, name in enumerate(labels):
        same = [j for j in by_speaker[name] if j != i]
        other = [j for j, n in enumerate(labels) if n != name]
        if not same or not other:  # a speaker heard once: no target trial to pair it with
            continue
        for _ in range(per_utterance // 2):
            out += [(i, rng.choice(same), True), (i, rng.choice(other), False)]
    return out
