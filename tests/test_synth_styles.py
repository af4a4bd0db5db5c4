"""The synthetic styles beyond the clean one: narrated speech (the transfer study's corpus)
and order pairs (a downstream property only order can decide)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from videolm.manifests.manifest import load_manifest
from videolm.manifests.narration import FILLER, NOISE, narrate
from videolm.manifests.synthetic import caption_for, make_spec, order_pair_spec, synthesize

SPEECH_RE = re.compile(r"^(?:(?:now|so|here|okay and|and then|look,) )?(?:the \w+ \d|the \d|this \w+ one|it|something)"
                       r" (?:(?:moves|goes|slides|heads) (?:left|right|up|down)|comes in)$")


def _narrations(n=1500, seed=3):
    return [(make_spec(seed, i), narrate(make_spec(seed, i), seed, i)) for i in range(n)]


def test_narration_follows_the_documented_noise_model():
    said = events = fillers = absent = 0
    seconds, shifts = 0.0, []
    for spec, lines in _narrations():
        events += len(spec.events)
        seconds += spec.duration
        for line in lines:
            assert line.kind == "asr" and 0 <= line.start < line.end <= spec.duration + 1e-9
            if line.text in FILLER:
                fillers += 1
                continue
            assert SPEECH_RE.match(line.text), line.text
        for e in spec.events:  # a line about e: starts within the shift of e.start and names nothing else
            near = [c for c in lines if c.text not in FILLER and abs(c.start - e.start) <= NOISE.shift_s + 1e-6
                    and str(e.digit) in c.text.split()]
            if near:
                shifts.append(min(abs(c.start - e.start) for c in near))
        said += sum(c.text not in FILLER for c in lines)
    absent = said - len(shifts)  # lines about events not on screen (roughly: digits repeat)
    spoken_per_event = said / events
    # said + absent per event: 0.75 + 0.2 expected; the digit is named in 60% of lines only, so
    # `shifts` undercounts, and the filler rate is per second of video
    assert 0.85 < spoken_per_event < 1.05
    assert abs(fillers / seconds - NOISE.filler_per_s) < 0.03
    assert max(shifts) <= NOISE.shift_s + 0.01 and np.mean(shifts) > 0.5  # shifted, not on the event
    assert absent > 0


def test_narration_names_only_part_of_an_event_and_is_deterministic():
    spec = make_spec(5, 11)
    assert narrate(spec, 5, 11) == narrate(make_spec(5, 11), 5, 11)
    texts = [c.text for _, lines in _narrations(300) for c in lines if c.text not in FILLER]
    full = [t for t in texts if re.search(r"the \w+ \d (moves|goes|slides|heads)", t)]
    assert 0.1 < len(full) / len(texts) < 0.5  # all three attributes in about 0.6^3 / (1 - 0.4^3) of lines


def test_narrated_style_keeps_the_clean_pixels(tmp_path):
    clean = load_manifest(synthesize(tmp_path / "c", 3, seed=4, progress=False))
    spoken = load_manifest(synthesize(tmp_path / "n", 3, seed=4, progress=False, style="narrated"))
    for c, n in zip(clean, spoken):
        assert open(c.path, "rb").read() == open(n.path, "rb").read()
        assert all(x.kind == "caption" for x in c.captions) and all(x.kind == "asr" for x in n.captions)
        assert n.captions == narrate(make_spec(4, int(n.video_id[-5:])), 4, int(n.video_id[-5:]))


def test_order_pairs_share_everything_but_the_order(tmp_path):
    for pair in range(20):
        a, b = order_pair_spec(8, 2 * pair), order_pair_spec(8, 2 * pair + 1)
        assert a == make_spec(8, pair)
        assert [(e.start, e.end) for e in a.events] == [(e.start, e.end) for e in b.events]
        assert [caption_for(e) for e in b.events] == [caption_for(e) for e in reversed(a.events)]
        assert (a.background, a.seed, a.size, a.fps, a.duration) == (b.background, b.seed, b.size, b.fps, b.duration)
    entries = load_manifest(synthesize(tmp_path / "o", 4, seed=8, progress=False, style="order_pairs"))
    queries = [[c for c in e.captions if c.kind == "query"] for e in entries]
    assert all(len(q) == 1 for q in queries)
    first, second = queries[0][0].text, queries[1][0].text
    assert first != second and sorted(first.split(", then ")) == sorted(second.split(", then "))
    assert first.split(", then ") == [c.text for c in entries[0].captions if c.kind == "caption"]


def test_styles_are_checked():
    with pytest.raises(ValueError, match="style 'noisy' is not one of clean, narrated, order_pairs"):
        synthesize("/nonexistent", 2, 0, style="noisy")
    with pytest.raises(ValueError, match="n_videos must be even"):
        synthesize("/nonexistent", 3, 0, style="order_pairs")


def test_cli_says_what_is_wrong_in_one_line(tmp_path, capsys):
    from videolm.cli import main

    assert main(["synth", "--out", str(tmp_path), "--videos", "3", "--style", "order_pairs"]) == 2
    assert "n_videos must be even, got 3" in capsys.readouterr().err
