"""Narration in the style of HowTo100M: the pretraining corpus's weak, noisy text.

HowTo100M pairs instructional videos with their speech (ASR), not with captions:
what is said is often early or late against what is shown, names only part of
it, is mixed with talk about nothing on screen, and sometimes describes what the
camera never shows. ``narrate(spec, seed, index)`` writes such subtitles for a
synthetic video (``synthetic.make_spec``); the video itself is rendered exactly
as the clean style's. The rates are ``NOISE`` and are documented in
``docs/transfer.md``; they were fixed before any transfer study ran and are not
tuned to favour an objective.

Every line is a ``Caption`` of kind ``asr``, so evaluators that only read
descriptions (kinds ``caption``/``query``/unset) never take narration for a label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import Caption

_NARRATION_SALT = 0x0A55_0F7E  # keeps the narration stream apart from the video's own


@dataclass(frozen=True)
class NarrationNoise:
    said: float = 0.75  # probability that an event on screen is narrated at all
    shift_s: float = 2.0  # a narrated line starts uniformly within +- this of its event's start
    line_s: tuple[float, float] = (1.2, 2.5)  # how long a spoken line lasts, seconds
    attribute: float = 0.6  # each of colour, digit, direction is named with this probability (>= 1 named)
    filler_per_s: float = 0.15  # unrelated lines per second of video (Poisson)
    absent: float = 0.2  # lines about an event that is not on screen, per event (Poisson)


NOISE = NarrationNoise()

# Spoken variety: the verb and the opening change from line to line, as speech does.
_VERBS = ("moves", "goes", "slides", "heads")
_OPENINGS = ("", "now ", "so ", "here ", "okay and ", "and then ", "look, ")
FILLER = (
    "okay let's get started",
    "make sure you subscribe to the channel",
    "this part is really easy",
    "i will show you a little trick",
    "you can pause the video here",
    "that's it for this step",
    "thanks for watching",
    "let me know in the comments",
    "we are almost done",
    "this is my favourite part",
    "take your time with this one",
    "don't worry if it looks messy",
    "i usually do this in the morning",
    "you will need a bit of patience",
    "alright moving on",
)


def spoken_line(colour: str | None, digit: int | None, direction: str | None, rng: np.random.Generator) -> str:
    """One narration sentence naming the given attributes (None: not named)."""
    verb = _VERBS[rng.integers(len(_VERBS))]
    opening = _OPENINGS[rng.integers(len(_OPENINGS))]
    if digit is not None:
        subject = f"the {colour} {digit}" if colour else f"the {digit}"
    else:
        subject = f"this {colour} one" if colour else "it"
    if direction is None:
        body = f"{subject} comes in" if digit is not None or colour else "something comes in"
    else:
        body = f"{subject} {verb} {direction}"
    return (opening + body).strip()


def _named(rng: np.random.Generator, p: float) -> tuple[bool, bool, bool]:
    """Which of (colour, digit, direction) a line names: each with probability p, at least one."""
    while True:
        picks = tuple(bool(x) for x in rng.random(3) < p)
        if any(picks):
            return picks


def _line_about(colour, digit, direction, start: float, duration: float, rng, noise: NarrationNoise) -> Caption:
    say_colour, say_digit, say_direction = _named(rng, noise.attribute)
    text = spoken_line(colour if say_colour else None, digit if say_digit else None,
                       direction if say_direction else None, rng)
    length = rng.uniform(*noise.line_s)
    begin = float(np.clip(start, 0.0, max(duration - length, 0.0)))
    return _timed(begin, length, duration, text)


def _timed(begin: float, length: float, duration: float, text: str) -> Caption:
    limit = np.floor(duration * 100) / 100  # rounded times stay inside the video
    return Caption(min(round(begin, 2), limit - 0.01), min(round(begin + length, 2), limit), text, "asr")


def narrate(spec, seed: int, index: int, noise: NarrationNoise = NOISE) -> tuple[Caption, ...]:
    """Narration subtitles of video ``index`` of seed ``seed`` (``spec`` = ``make_spec(seed, index)``), by time."""
    from .synthetic import DIRECTIONS, PALETTE  # synthetic imports this module for its narrated style

    rng = np.random.default_rng([_NARRATION_SALT, seed, index])
    duration = spec.duration
    lines = []
    for e in spec.events:
        if rng.random() < noise.said:
            start = e.start + rng.uniform(-noise.shift_s, noise.shift_s)
            lines.append(_line_about(e.colour, e.digit, e.direction, start, duration, rng, noise))
    for _ in range(rng.poisson(noise.absent * len(spec.events))):
        # an event the camera never shows: attributes drawn afresh, at a random time
        colour = list(PALETTE)[rng.integers(len(PALETTE))]
        lines.append(_line_about(colour, int(rng.integers(10)), DIRECTIONS[rng.integers(len(DIRECTIONS))],
                                 rng.uniform(0, duration), duration, rng, noise))
    for _ in range(rng.poisson(noise.filler_per_s * duration)):
        length = rng.uniform(*noise.line_s)
        begin = rng.uniform(0, max(duration - length, 0.0))
        lines.append(_timed(begin, length, duration, FILLER[rng.integers(len(FILLER))]))
    if not lines:  # a narrated video always says something (HowTo100M keeps only videos with speech)
        lines.append(_timed(0.0, noise.line_s[0], duration, FILLER[rng.integers(len(FILLER))]))
    return tuple(sorted(lines, key=lambda c: (c.start, c.end, c.text)))
