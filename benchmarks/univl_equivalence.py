#!/usr/bin/env python
"""UniVL equivalence: the reference model (microsoft/UniVL's own code, random weights, small size)
against the same weights imported with ``videolm import-checkpoint univl``.

Steps: build the reference (``univl_reference.build_reference``: UniVL's
``modules/`` from a local checkout, in a temp dir), save its state dict as
``univl.pretrained.bin``, run ``import-checkpoint`` on it (the real command line),
load the run with ``load_pretrained`` (what ``eval-retrieval`` does), and feed both
models the same padded inputs. Prints ONE JSON object: the max absolute
difference (fp32) of the text, visual and cross encoder outputs, the pooled
cross state, the decoder logits, the joint similarity matrix (UniVL's mean-pooled,
L2-normalised dot products) and the all-pairs align score matrix; ``ok`` when all
are <= 1e-5.

Also checked (``padding_invariant``): videolm's outputs for a batch padded only to
its longest text equal those at UniVL's fixed ``max_words`` padding (clip t sits
at cross position ``max_text_len + t`` either way).

Use: python benchmarks/univl_equivalence.py [--checkout DIR]   (default: $UNIVL_CHECKOUT or the local mirror)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOLERANCE = 1e-5
MAX_WORDS, FRAMES, CAPTION, BATCH = 20, 12, 10, 5


def make_inputs(sizes: dict, seed: int = 0) -> dict:
    """Padded text ([CLS] ... [SEP] of different lengths), clips with padding, captions."""
    g = torch.Generator().manual_seed(seed)
    text_lens, clip_lens, cap_lens = [20, 7, 13, 4, 16], [12, 5, 9, 1, 12], [10, 4, 7, 3, 6]
    ids = torch.zeros(BATCH, MAX_WORDS, dtype=torch.long)
    caps = torch.zeros(BATCH, CAPTION, dtype=torch.long)
    for i, (n, c) in enumerate(zip(text_lens, cap_lens)):
        ids[i, :n] = torch.randint(1000, sizes["vocab"], (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 101, 102
        caps[i, :c] = torch.randint(1000, sizes["vocab"], (c,), generator=g)
        caps[i, 0] = 101
    lens = torch.tensor(text_lens)
    video = torch.randn(BATCH, FRAMES, sizes["video_dim"], generator=g) * 3 + 1
    return {"text_ids": ids, "text_mask": torch.arange(MAX_WORDS)[None] < lens[:, None],
            "video": video, "video_mask": torch.arange(FRAMES)[None] < torch.tensor(clip_lens)[:, None],
            "caption_ids": caps, "caption_mask": torch.arange(CAPTION)[None] < torch.tensor(cap_lens)[:, None]}


@torch.no_grad()
def videolm_outputs(model, x: dict) -> dict:
    tm, vm = x["text_mask"], x["video_mask"]
    text_h = model.encode_text(x["text_ids"], tm)
    video_h = model.encode_video(vm, x["video"])
    ct, cv, pooled = model.cross(text_h, tm, video_h, vm)
    logits = model.decode(x["caption_ids"], x["caption_mask"], torch.cat([ct, cv], 1), torch.cat([tm, vm], 1))
    joint = model.joint.text(text_h, tm) @ model.joint.video(video_h, vm).t()
    B = len(tm)
    ti, vi = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
    pairs = model.align_score(model.pair_pooled(x, ti, vi)).view(B, B)
    return {"text": text_h, "visual": video_h, "cross": torch.cat([ct, cv], 1), "pooled": pooled,
            "decoder_logits": logits, "joint_similarity": joint, "cross_similarity": pairs}


def shortest_padding(x: dict) -> dict:
    n = int(x["text_mask"].sum(1).max())
    return {**x, "text_ids": x["text_ids"][:, :n], "text_mask": x["text_mask"][:, :n]}


def compare(checkout: Path, workdir: Path) -> dict:
    from univl_reference import SMALL, build_reference, reference_outputs

    from videolm.cli import main as videolm_main
    from videolm.pretrain.checkpoint import load_pretrained

    ref, state_path = build_reference(checkout, workdir, SMALL)
    run = workdir / "imported"
    rc = videolm_main(["import-checkpoint", "univl", str(state_path), "--out", str(run), "--heads", str(SMALL["heads"]),
                       "--max-words", str(MAX_WORDS), "--max-frames", str(SMALL["visual_positions"])])
    if rc != 0:
        raise RuntimeError(f"import-checkpoint exited {rc}")
    model, _tok, _cfg = load_pretrained(run)
    x = make_inputs(SMALL)
    theirs = reference_outputs(ref, x["text_ids"], x["text_mask"].long(), x["video"], x["video_mask"].long(),
                               x["caption_ids"], x["caption_mask"].long())
    ours = videolm_outputs(model, x)
    diffs = {k: float((ours[k].float() - theirs[k].float()).abs().max()) for k in theirs}
    short = videolm_outputs(model, shortest_padding(x))
    n = short["text"].shape[1]
    same = {"text": short["text"] - ours["text"][:, :n], "pooled": short["pooled"] - ours["pooled"],
            "joint_similarity": short["joint_similarity"] - ours["joint_similarity"],
            "cross_similarity": short["cross_similarity"] - ours["cross_similarity"]}
    padding = {k: float(v.abs().max()) for k, v in same.items()}
    return {"max_abs_diff": diffs, "tolerance": TOLERANCE, "ok": max(diffs.values()) <= TOLERANCE,
            "padding_invariant": padding, "sizes": SMALL,
            "inputs": {"batch": BATCH, "max_words": MAX_WORDS, "frames": FRAMES, "caption": CAPTION},
            "checkout": str(checkout)}


def main() -> int:
    from univl_reference import find_checkout

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", help="microsoft/UniVL checkout or bare git directory")
    args = p.parse_args()
    checkout = find_checkout(args.checkout)
    if checkout is None:
        print(json.dumps({"skipped": "no microsoft/UniVL checkout (give --checkout or set UNIVL_CHECKOUT)"}))
        return 0
    with tempfile.TemporaryDirectory(prefix="univl_equiv_") as tmp:
        result = compare(checkout, Path(tmp))
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
