"""Speech data synthesised offline with espeak-ng and sox, deterministic by seed, cached.

Speakers are espeak-ng voices x voice variants x pitch offsets; a seeded quarter of them is held
out for testing, so every test set is spoken by voices the model never heard. Each utterance is
synthesised at 22.05 kHz, resampled by sox to 16 kHz mono, and mixed with white noise at a seeded
SNR between 10 and 30 dB. Four tasks:

* ``"asr"``: short sentences (CTC characters; CER on held-out speakers);
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

VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029")
VARIANTS = ("m1", "m3", "m7", "f1", "f3", "f5")
PITCHES = (35, 50, 65)
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
    """All voice x variant x pitch speakers, split 3:1 into ``train`` and ``test`` (held out)."""
    everyone = [Speaker(*combo) for combo in itertools.product(VOICES, VARIANTS, PITCHES)]
    random.Random(seed).shuffle(everyone)
    cut = len(everyone) * 3 // 4
    return {"train": everyone[:cut], "test": everyone[cut:]}


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
    if task == "asr":
        return [(t, s, "neutral", t) for s in people for t in SENTENCES[:8]]
    if task == "intent":
        return [(p, s, "neutral", i) for s in people for i, ps in INTENTS.items() for p in ps[:2]]
    if task == "emotion":
        return [(t, s, style, style) for s in people for style in STYLES for t in SENTENCES[8:10]]
    if task == "speaker":
        return [(t, s, "neutral", s.name) for s in people for t in SENTENCES[10:14]]
    raise AdapterError(f"unknown speech task {task!r}; choose asr, intent, emotion or speaker")


def load(task: str, split: str, seed: int = 0, limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Audio and labels of one task and split, synthesised once and cached."""
    chosen = items(task, split, seed)
    chosen = random.Random(seed).sample(chosen, limit) if limit and limit < len(chosen) else chosen
    key = hashlib.sha256(json.dumps([task, split, seed, limit, VOICES, VARIANTS, PITCHES]).encode()).hexdigest()[:16]
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
