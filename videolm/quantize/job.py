"""``videolm quantize``: fit a codebook over a feature directory and tokenise every clip.

Steps: sample clip vectors uniformly over all shards (reading only the blocks that
hold sampled rows) -> fit the tree (quantize.py) -> assign every clip -> publish.

Crash safety: feature shards are only ever read. The fitted codebook and each
shard's tokens are first written as ``*.partial-<fingerprint>`` files; only when
every shard is tokenised are they renamed into place (tokens first, the codebook
last). A killed run leaves partials that the next run with the same settings
reuses; an error (NaN features) deletes them, so nothing is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import from_dict, to_dict
from ..errors import VideolmError
from ..features.layout import (
    CODEBOOK_NAME, EXTRACT_CONFIG_NAME, list_shards, partial_name, planned_shard_count, token_path,
    unfinished_quantize_files,
)
from ..features.shards import ShardReader, check_same_config, config_key
from ..features.visual_words import (
    read_codebook, read_codebook_attrs, read_token_attrs, read_token_file, write_codebook, write_token_file,
)
from ..model.inputs import VISUAL_SPECIAL_TOKENS, VISUAL_TOKEN_OFFSET
from .kmeans import Codebook, QuantizeConfig, fit_codebook, normalize_rows, word_stats

log = logging.getLogger("videolm.quantize.kmeans")


class QuantizeError(VideolmError, RuntimeError):
    pass


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _video_at(reader: ShardReader, row: int) -> str:
    for vid, a, n in reader.video_spans():
        if a <= row < a + n:
            return vid
    return "?"


def _check_finite(values: np.ndarray, reader: ShardReader, rows: np.ndarray) -> None:
    """``values[i]`` is row ``rows[i]`` of the shard; name the first bad row's video."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        row = int(rows[int(np.argmax(bad))])
        raise QuantizeError(f"{reader.path.name}: NaN/inf features at row {row} (video {_video_at(reader, row)!r}); "
                            "re-extract that shard")


def sample_features(readers: list[ShardReader], n: int, seed: int, progress: bool) -> np.ndarray:
    """``n`` clip vectors drawn uniformly without replacement over all shards' clips."""
    sizes = np.array([r.num_clips for r in readers], dtype=np.int64)
    total = int(sizes.sum())
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size=min(n, total), replace=False))
    out = np.empty((len(rows), readers[0].dim), dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    filled = 0
    with _bar(len(readers), "sample", progress) as bar:
        for i, r in enumerate(readers):
            local = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
            for a, block in r.iter_blocks(rows=local):
                pick = local[(local >= a) & (local < a + len(block))] - a
                picked = block[pick]
                _check_finite(picked, r, a + pick)
                out[filled : filled + len(pick)] = picked  # float16 -> float32 on assignment
                filled += len(pick)
            bar.update(1)
    return out


def _codebook_attrs(cb: Codebook, cfg: QuantizeConfig, features_key: str, sample: int, inertia: list[float]) -> dict:
    return {
        "k": cfg.k,
        "levels": cfg.levels,
        "dim": cb.dim,
        "normalize": cfg.normalize,
        "config": json.dumps(to_dict(cfg), sort_keys=True),
        "features_config": features_key,
        "sample_size": sample,
        "inertia_per_level": json.dumps(inertia),
        "vocab_size": cb.vocab_size,
        "leaves": int(len(cb.levels[-1]["centroids"])),
        "special_tokens": json.dumps(list(VISUAL_SPECIAL_TOKENS)),
        "token_offset": VISUAL_TOKEN_OFFSET,
        "model_vocab_size": cb.vocab_size + VISUAL_TOKEN_OFFSET,
        "fingerprint": cb.fingerprint(),
        "videolm_version": __version__,
    }


def load_codebook(path: str | Path) -> tuple[Codebook, dict]:
    levels, attrs = read_codebook(path)
    return Codebook(int(attrs["k"]), levels, str(attrs["normalize"])), attrs


def _check_extraction_finished(directory: Path, paths: list[Path]) -> None:
    """A codebook fitted before every extraction node finished would be fitted on a subset of the data."""
    config = directory / EXTRACT_CONFIG_NAME
    if not config.is_file():  # shards written by other means: nothing to compare with
        return
    expected = planned_shard_count(json.loads(config.read_text()).get("key", {}))
    if expected is not None and len(paths) < expected:
        raise QuantizeError(f"{directory}: {len(paths)} of {expected} shards are finished; extraction is still "
                            "running or was interrupted. Quantise after every extraction node has finished "
                            "(re-run `videolm extract` to complete it)")


def run_quantize(features: str | Path, cfg: QuantizeConfig | None, report_dir: str | Path | None = None,
                 overwrite: bool = False, progress: bool = True, codebook_from: str | Path | None = None) -> dict:
    """Fit ``cfg``'s codebook over ``features`` and tokenise them; with ``codebook_from`` (a codebook file
    or a feature directory holding one) tokenise them with that codebook instead (``cfg`` is then
    taken from it: None is fine), e.g. val/test videos with the words fitted on the training set."""
    t0 = time.monotonic()
    directory = Path(features)
    paths = list_shards(directory)
    if not paths:
        raise QuantizeError(f"{directory}: no feature shards (shard_*.h5); run `videolm extract` first")
    _check_extraction_finished(directory, paths)
    readers = [ShardReader(p) for p in paths]
    try:
        check_same_config(readers, directory)
        total = sum(r.num_clips for r in readers)
        if total == 0:
            raise QuantizeError(f"{directory}: the shards hold no clips (did every video fail? see failures.jsonl)")
        features_key = config_key(readers[0].config)
        given = _given_codebook(codebook_from, features_key) if codebook_from is not None else None
        cfg_json = given[1]["config"] if given else json.dumps(to_dict(cfg), sort_keys=True)
        cfg = from_dict(QuantizeConfig, json.loads(cfg_json)) if given else cfg
        if given is None and total < cfg.k:  # a given codebook assigns any number of clips
            raise QuantizeError(f"{directory}: {total} clips cannot make {cfg.k} clusters")
        final_cb = directory / CODEBOOK_NAME
        existing = read_codebook_attrs(final_cb)
        if given is not None and existing is not None and existing["fingerprint"] != given[1]["fingerprint"]:
            if not overwrite:
                raise QuantizeError(f"{final_cb} is another codebook than {codebook_from}'s; pass --overwrite to "
                                    "replace it and its tokens")
            existing = None
        if existing is not None and (existing["config"] != cfg_json or existing["features_config"] != features_key):
            if not overwrite:
                raise QuantizeError(f"{final_cb} was fitted with other settings ({existing['config']}); "
                                    "pass --overwrite to replace it and its tokens")
            existing = None
        summary = _quantize(directory, readers, cfg, cfg_json, features_key, existing, progress, given)
    finally:
        for r in readers:
            r.close()
    summary["seconds"] = round(time.monotonic() - t0, 2)
    if report_dir is not None:
        write_report(Path(report_dir), summary)
        summary["report_dir"] = str(report_dir)
    return summary


def _given_codebook(path: str | Path, features_key: str) -> tuple[Codebook, dict]:
    path = Path(path)
    path = path / CODEBOOK_NAME if path.is_dir() else path
    if read_codebook_attrs(path) is None:
        raise QuantizeError(f"--codebook {path}: no codebook there (a codebook.h5, or a quantised feature directory)")
    codebook, attrs = load_codebook(path)
    if attrs["features_config"] != features_key:
        raise QuantizeError(f"--codebook {path} was fitted on features extracted with other settings "
                            f"({attrs['features_config']}) than these ({features_key})")
    return codebook, attrs


def _quantize(directory, readers, cfg, cfg_json, features_key, existing, progress, given=None) -> dict:
    final_cb = directory / CODEBOOK_NAME
    tag = hashlib.sha256((cfg_json + features_key).encode()).hexdigest()[:12]  # names this config's partials
    partial_cb = partial_name(final_cb, tag)
    if given is not None and existing is None:  # published like a fitted one: tokens first, the codebook last
        write_codebook(partial_cb, given[0].levels, given[1])
        (codebook, attrs), t_fit = given, 0.0
    else:
        codebook, attrs, t_fit = _codebook_to_use(final_cb, partial_cb, existing, readers, cfg, features_key,
                                                  progress)
    fingerprint = attrs["fingerprint"]
    _remove_stale(directory, keep={partial_cb.name} | {partial_name(token_path(r.path), fingerprint).name
                                                       for r in readers})
    t = time.monotonic()
    counts, to_publish = _tokenise_shards(readers, codebook, fingerprint, partial_cb, progress)
    for src, dst in to_publish:  # tokens first: a reader trusts them only with the matching codebook
        src.replace(dst)
    if partial_cb.exists():
        partial_cb.replace(final_cb)
    return _summary(directory, final_cb, attrs, counts, t_fit, time.monotonic() - t)


def _codebook_to_use(final_cb: Path, partial_cb: Path, existing: dict | None, readers: list[ShardReader],
                     cfg: QuantizeConfig, features_key: str, progress: bool) -> tuple[Codebook, dict, float]:
    """The published codebook when its settings match, else an interrupted run's, else a new fit (written as a
    partial); with the seconds spent fitting."""
    if existing is not None:
        codebook, attrs = load_codebook(final_cb)
        _say(progress, f"quantize: reusing {final_cb.name} (same settings)")
        return codebook, attrs, 0.0
    if partial_cb.exists():
        codebook, attrs = load_codebook(partial_cb)
        _say(progress, "quantize: resuming with the codebook fitted by an interrupted run")
        return codebook, attrs, 0.0
    t = time.monotonic()
    codebook, attrs = _fit(readers, cfg, features_key, progress)
    write_codebook(partial_cb, codebook.levels, attrs)
    return codebook, attrs, time.monotonic() - t


def _fit(readers: list[ShardReader], cfg: QuantizeConfig, features_key: str, progress: bool) -> tuple[Codebook, dict]:
    sample = sample_features(readers, cfg.sample, cfg.seed, progress)
    sample = normalize_rows(sample, cfg.normalize, inplace=True)
    codebook, inertia = fit_codebook(sample, cfg, _level_bars(cfg.levels, progress))
    return codebook, _codebook_attrs(codebook, cfg, features_key, len(sample), inertia)


def _level_bars(levels: int, progress: bool):
    """A ``fit_codebook`` progress callback: one bar per tree level."""
    bars = {}

    def on_level(level, done, total):
        if level not in bars:
            bars[level] = _bar(total, f"fit level {level + 1}/{levels}", progress)
        bars[level].update(1)
        if done == total:
            bars[level].close()

    return on_level


def _tokenise_shards(readers: list[ShardReader], codebook: Codebook, fingerprint: str, partial_cb: Path,
                     progress: bool) -> tuple[np.ndarray, list[tuple[Path, Path]]]:
    """Clips per word over all shards, and the (partial, final) token files to publish.

    On a QuantizeError (NaN features) every partial of this run is deleted, so nothing gets published.
    """
    counts = np.zeros(codebook.vocab_size, dtype=np.int64)
    to_publish = []
    try:
        with _bar(len(readers), "assign", progress) as bar:
            for r in readers:
                tokens, written = _shard_tokens(r, codebook, fingerprint)
                if written != token_path(r.path):
                    to_publish.append((written, token_path(r.path)))
                counts += np.bincount(tokens, minlength=codebook.vocab_size)
                bar.update(1)
    except QuantizeError:
        for p, _ in to_publish:
            p.unlink(missing_ok=True)
        partial_cb.unlink(missing_ok=True)
        raise
    return counts, to_publish


def _shard_tokens(reader: ShardReader, codebook: Codebook, fingerprint: str) -> tuple[np.ndarray, Path]:
    """The shard's words and the file holding them: a token file of this codebook when one exists (published
    or left by an interrupted run), else a partial written now."""
    final_tok = token_path(reader.path)
    partial_tok = partial_name(final_tok, fingerprint)
    for p in (final_tok, partial_tok):
        if (read_token_attrs(p) or {}).get("codebook_fingerprint") == fingerprint:
            return read_token_file(p)[0], p
    tokens, paths = _assign_shard(reader, codebook)
    write_token_file(partial_tok, tokens, paths, {
        "codebook_fingerprint": fingerprint, "shard": reader.path.name, "num_clips": reader.num_clips,
        "manifest_sha256": str(reader.attrs.get("manifest_sha256", "")),
    })
    return tokens, partial_tok


def _summary(directory: Path, final_cb: Path, attrs: dict, counts: np.ndarray, t_fit: float,
             t_assign: float) -> dict:
    stats = word_stats(counts, int(attrs["leaves"]))
    return {
        "features": str(directory),
        "codebook": str(final_cb),
        "config": json.loads(attrs["config"]),
        "vocab_size": int(attrs["vocab_size"]),
        "token_offset": int(attrs["token_offset"]),
        "sample_size": int(attrs["sample_size"]),
        "inertia_per_level": json.loads(attrs["inertia_per_level"]),
        **stats,
        "fit_seconds": round(t_fit, 2),
        "assign_seconds": round(t_assign, 2),
        "assign_clips_per_s": round(stats["clips"] / t_assign, 1) if t_assign > 0 else None,
        "word_counts": counts,
    }


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """Delete half-written files of killed runs and partials of other settings.

    One quantize run per directory at a time: a concurrent run's files would look stale.
    """
    for p in unfinished_quantize_files(directory):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def _assign_shard(reader: ShardReader, codebook: Codebook):
    tokens, paths = [np.zeros(0, np.int32)], [np.zeros((0, codebook.depth), np.int16)]
    for a, block in reader.iter_blocks():
        _check_finite(block, reader, np.arange(a, a + len(block)))
        w, p, _ = codebook.assign(normalize_rows(block, codebook.normalize, inplace=True))
        tokens.append(w)
        paths.append(p)
    return np.concatenate(tokens), np.concatenate(paths)


def summary_lines(s: dict) -> list[str]:
    inertia = ", ".join(f"{v:.4g}" for v in s["inertia_per_level"])
    return [
        f"quantize: {s['clips']} clips -> {s['words_used']} of {s['leaves']} leaves used "
        f"({s['empty_leaves']} empty; vocabulary {s['vocab_size']} ids, model offset {s['token_offset']})",
        f"quantize: entropy {s['entropy_bits']:.2f} of {s['max_entropy_bits']:.2f} bits "
        f"(perplexity {s['perplexity']:.1f}); sample inertia per level: {inertia}",
        f"quantize: fit {s['fit_seconds']:.1f} s on {s['sample_size']} samples, "
        f"assign {s['assign_seconds']:.1f} s; codebook {s['codebook']}",
    ]


def write_report(out: Path, summary: dict) -> None:
    """JSON summary plus a PNG of word frequencies, sorted, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")  # no display on batch machines
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(summary["word_counts"])
    data = {k: v for k, v in summary.items() if k != "word_counts"}
    used = counts[counts > 0]
    data["top_words"] = [[int(w), int(counts[w])] for w in np.argsort(-counts, kind="stable")[:20] if counts[w] > 0]
    (out / "quantize_summary.json").write_text(json.dumps(data, indent=2))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ranked = np.sort(used)[::-1]
    axes[0].plot(np.arange(1, len(ranked) + 1), ranked, drawstyle="steps-post")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("word rank")
    axes[0].set_ylabel("clips")
    axes[0].set_title(f"{len(used)} of {summary['leaves']} words used")
    axes[1].hist(np.log10(used), bins=40)
    axes[1].set_xlabel("log10(clips per used word)")
    axes[1].set_ylabel("words")
    axes[1].set_title(f"entropy {summary['entropy_bits']:.2f} / {summary['max_entropy_bits']:.2f} bits")
    fig.suptitle(f"visual words: k={summary['config']['k']}, levels={summary['config']['levels']}, "
                 f"{summary['clips']} clips")
    fig.tight_layout()
    fig.savefig(out / "word_frequencies.png", dpi=100)
    plt.close(fig)

