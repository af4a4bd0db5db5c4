#!/usr/bin/env python
"""A UniVL stage-2 pretraining step: videolm against microsoft/UniVL's own modules, same size, same batches.

Prints ONE JSON object on stdout (progress on stderr). UniVL's model is built from a
local checkout (``univl_reference.build_reference``: its ``modules/`` copied to a temp
dir, random weights; nothing of it is copied into videolm); without a checkout the
script prints ``{"skipped": reason}``.

Size (both sides): hidden 384, 6 heads, feed-forward 1536, text 3 / video 2 / cross 1
/ decoder 1 layers, 1024-d features, up to 32 clips and 48 words, batch 16, fp32,
CPU. Batches: ``--steps`` real collated batches of the UniVL recipe's data
(``bench_train.make_data``: caption segments of at least 5 s); UniVL gets the same
texts, clips and masks, its text corrupted at 15% and 15% of its clips masked.

* ``univl``: ``UniVL.forward`` in training mode (stage two, pretraining: joint
  max-margin on the clean pass; MLM, MFM-NCE, caption and the B x B cross-encoder
  similarity on its masked pass), backward, AdamW. ``univl_fixed_padding`` pads
  every text to ``max_words`` and every video to ``max_frames``, as UniVL's data
  loaders do (its default); ``univl`` pads to the batch's longest, as videolm does.
* ``videolm``: ``train_step`` of the same objectives (joint, mlm, mfm_nce, align,
  caption). ``videolm_equal_work`` uses ``align.negatives=8``, so that both sides
  run the same number of cross-encoder sequences per step (UniVL: B masked + B x B
  pairs + B again for the decoder = 288 at B = 16; videolm: B masked + B x (1 + 2k)
  pairs = 288 at k = 8); ``videolm`` is the recipe's default ``negatives: 3``.

``gflops_per_step``: one step's forward and backward counted by torch's
``FlopCounterMode`` (matmuls and attention; the optimiser adds none), on the first
batch; ``flops_ratio_equal_work = videolm_equal_work / univl`` (target <= 1).

Rounds alternate the four modes (order flipped every round); medians over rounds
of the per-run median step. ``ratio_equal_work = videolm_equal_work / univl`` and
``ratio_defaults = videolm / univl_fixed_padding``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = dict(hidden=384, heads=6, intermediate=1536, text_layers=3, visual_layers=2, cross_layers=1, decoder_layers=1,
            vocab=30522, text_positions=64, visual_positions=32, cross_positions=96, video_dim=1024, type_vocab=2)
WORDS, FRAMES, BATCH = 48, 32, 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def videolm_run(features: Path, entries, negatives: int):
    from videolm.features.shards import FeatureStore
    from videolm.pretrain.recipe import recipe_from_dict
    from videolm.pretrain.run import build_run

    raw = {"data": {"mode": "segment", "max_frames": FRAMES, "min_segment_seconds": 5.0},
           "model": {"architecture": "two_stream", "hidden": 384, "heads": 6, "text_init": "none", "text_layers": 3,
                     "video_layers": 2, "cross_layers": 1, "decoder_layers": 1, "max_frames": FRAMES,
                     "max_text_len": WORDS, "embed_dim": 0, "dropout": 0.1},
           "train": {"batch_size": BATCH, "lr": 1e-4, "warmup_steps": 1, "max_steps": 1000, "num_workers": 0,
                     "device": "cpu"},
           "mixing": "sum",
           "objectives": {"joint": {}, "mlm": {"mask_prob": 0.15}, "mfm_nce": {"mask_prob": 0.15},
                          "align": {"negatives": negatives}, "caption": {}}}
    return build_run(recipe_from_dict(raw), FeatureStore(features), entries, "cpu")


def univl_inputs(batch: dict, fixed: bool, seed: int):
    """UniVL's forward arguments for a videolm batch (the same texts, clips and masks)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids, tm, video, vm = batch["text_ids"], batch["text_mask"].long(), batch["video"], batch["video_mask"].long()
    if fixed:  # UniVL's loaders pad to max_words / max_frames
        ids = torch.nn.functional.pad(ids, (0, WORDS - ids.shape[1]))
        tm = torch.nn.functional.pad(tm, (0, WORDS - tm.shape[1]))
        video = torch.nn.functional.pad(video, (0, 0, 0, FRAMES - video.shape[1]))
        vm = torch.nn.functional.pad(vm, (0, FRAMES - vm.shape[1]))
    words = (tm == 1) & (ids != 101) & (ids != 102)
    chosen = (torch.rand(ids.shape, generator=g) < 0.15) & words
    labels = torch.where(chosen, ids, torch.full_like(ids, -1))
    masked_text = ids.masked_fill(chosen, 103)
    hidden = (torch.rand(vm.shape, generator=g) < 0.15) & (vm == 1)
    masked_video = video.masked_fill(hidden[..., None], 0.0)
    video_labels = torch.where(hidden, torch.arange(vm.shape[1]).expand_as(vm), torch.full_like(vm, -1))
    caption_in, caption_out = ids[:, :-1], ids[:, 1:].masked_fill(tm[:, 1:] == 0, -1)
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=tm, video=video, video_mask=vm,
                pairs_masked_text=masked_text, pairs_token_labels=labels, masked_video=masked_video,
                video_labels_index=video_labels, input_caption_ids=caption_in, decoder_mask=tm[:, :-1],
                output_caption_ids=caption_out)


def time_univl(model, batches, fixed: bool) -> float:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i, batch in enumerate(batches):
        args = univl_inputs(batch, fixed, i)
        t0 = time.perf_counter()
        loss = model(**args)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] if len(times) > 2 else times)


def time_videolm(run, batches) -> float:
    from videolm.pretrain.trainer import train_step

    run.runner.train()
    times = []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(run, step, iter([batch]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] if len(times) > 2 else times)


def step_gflops(fn) -> float:
    """Forward + backward FLOPs of one step (torch's FlopCounterMode: matmuls, attention, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def univl_step(model, batch, fixed: bool):
    model.train()
    model(**univl_inputs(batch, fixed, 0)).backward()
    model.zero_grad(set_to_none=True)


def videolm_step(run, batch):
    from videolm.pretrain.trainer import train_step

    run.runner.train()
    train_step(run, 0, iter([batch]))


def main() -> int:
    import torch

    from bench_train import make_data
    from univl_reference import build_reference, find_checkout
    from videolm.manifests.manifest import load_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", help="microsoft/UniVL checkout or bare git dir (default $UNIVL_CHECKOUT or the mirror)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (the first is dropped as warmup)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    checkout = find_checkout(args.checkout)
    if checkout is None:
        print(json.dumps({"skipped": "no microsoft/UniVL checkout (give --checkout or set UNIVL_CHECKOUT)"}))
        return 0
    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_univl_"))
    data = make_data(root, 120, 2, SIZE["video_dim"])
    entries = load_manifest(data["manifest"])
    runs = {"videolm": videolm_run(Path(data["features"]), entries, 3),
            "videolm_equal_work": videolm_run(Path(data["features"]), entries, 8)}
    batches = [b for _, b in zip(range(args.steps), runs["videolm"].make_loader(0))]
    univl, _ = build_reference(checkout, root / "ref", SIZE)
    timers = {"univl": lambda: time_univl(univl, batches, fixed=False),
              "univl_fixed_padding": lambda: time_univl(univl, batches, fixed=True),
              "videolm": lambda: time_videolm(runs["videolm"], batches),
              "videolm_equal_work": lambda: time_videolm(runs["videolm_equal_work"], batches)}
    flops = {"univl": step_gflops(lambda: univl_step(univl, batches[0], False)),
             "univl_fixed_padding": step_gflops(lambda: univl_step(univl, batches[0], True)),
             "videolm": step_gflops(lambda: videolm_step(runs["videolm"], batches[0])),
             "videolm_equal_work": step_gflops(lambda: videolm_step(runs["videolm_equal_work"], batches[0]))}
    results = {k: [] for k in timers}
    for r in range(args.rounds):
        for name in (list(timers) if r % 2 == 0 else list(reversed(timers))):
            results[name].append(timers[name]())
            log(f"round {r} {name}: {results[name][-1]:.3f} s/step")
    med = {k: statistics.median(v) for k, v in results.items()}
    out = {"size": SIZE, "batch": BATCH, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
           "median_step_s": med, "runs_s": results, "gflops_per_step": {k: round(v, 1) for k, v in flops.items()},
           "flops_ratio_equal_work": round(flops["videolm_equal_work"] / flops["univl"], 3),
           "ratio_equal_work": med["videolm_equal_work"] / med["univl"],
           "ratio_defaults": med["videolm"] / med["univl_fixed_padding"],
           "targets": {"ratio_equal_work": 0.6, "ratio_defaults": 0.45}, "checkout": str(checkout)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
