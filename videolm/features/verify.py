"""``videolm verify``: check a feature directory end to end, and optionally repair it.

Checks, for every ``shard_NNNNN.h5``: the file opens (a truncated or overwritten
file is named with its size), every dataset is present and readable, the index
matches the datasets (offsets contiguous from 0, counts add up, attribute counts
agree), features and clip times are finite, and the recorded sha256 checksums
(``attrs['checksums']``, written by ShardWriter) still match. Then the directory:
every shard the recorded config implies is present, no video appears twice, and,
after ``videolm quantize``, the codebook and each token file (fingerprint, length,
range of word ids, checksums).

``repair_directory`` deletes broken shards and their token files, re-extracts them
with the directory's own recorded configuration (the manifest must be the one it
was written from: same sha256), re-tokenises with the existing codebook, and
verifies again. Extraction is deterministic, so a repaired shard holds exactly the
bytes an uninterrupted run would have written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VideolmError
from .hdf5 import ShardError, dataset_digest, decode_strings, plain_attrs, read_checksums
from .layout import (
    CODEBOOK_NAME, EXTRACT_CONFIG_NAME, list_shards, list_token_files, planned_shard_count, read_extract_config,
    set_aside_files, shard_index, shard_name, token_path, unfinished_files,
)
from .shards import FORMAT, SHARD_DATASETS, config_key, open_readonly
from .visual_words import (
    CODEBOOK_FORMAT, TOKEN_DATASETS, TOKENS_FORMAT, codebook_datasets, read_codebook_attrs, read_codebook_levels,
)


class VerifyError(VideolmError, RuntimeError):
    """verify/repair cannot proceed (no such directory, wrong manifest): a user error."""


@dataclass
class Problem:
    file: str  # name relative to the directory
    message: str
    severity: str = "error"  # or "warning"

    def line(self) -> str:
        return f"{'ERROR' if self.severity == 'error' else 'warning'} {self.file}: {self.message}"


def _has_error(problems: list[Problem]) -> bool:
    return any(p.severity == "error" for p in problems)


@dataclass
class VerifyReport:
    directory: str
    shards: int = 0
    shards_ok: int = 0
    clips: int = 0
    token_files: int = 0
    has_codebook: bool = False
    problems: list[Problem] = field(default_factory=list)
    broken_shards: list[int] = field(default_factory=list)  # shard indices to re-extract (damaged or missing)
    broken_tokens: list[str] = field(default_factory=list)  # token files to rewrite

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        state = "clean" if self.ok and not self.warnings else ("ok with warnings" if self.ok else "PROBLEMS FOUND")
        toks = f", {self.token_files} token file(s)" if self.has_codebook or self.token_files else ""
        return (f"verify: {self.directory}: {self.shards} shard(s), {self.shards_ok} ok, {self.clips} clips{toks}; "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s): {state}")


def _open(path: Path, problems: list[Problem], what: str):
    size = path.stat().st_size
    try:
        return open_readonly(path)  # shards.py and visual_words.py own the HDF5 layouts; verify reads through them
    except OSError as exc:
        detail = str(exc).split(";")[0][:160]
        problems.append(Problem(path.name, f"truncated or not an HDF5 file (size {size} bytes; {what}: {detail})"))
        return None


def _compare_checksums(f, name: str, values: dict, problems: list[Problem]) -> None:
    try:
        recorded = read_checksums(f.attrs)
    except (ValueError, TypeError):
        problems.append(Problem(name, "checksums attribute is not valid JSON"))
        return
    if recorded is None:
        problems.append(Problem(name, "no checksums recorded (written before checksums existed); "
                                      "structure checked only", "warning"))
        return
    digests = recorded.get("datasets", {})
    for key, value in values.items():
        want = digests.get(key)
        if want is None:
            problems.append(Problem(name, f"no checksum recorded for {key}", "warning"))
        elif dataset_digest(value) != want:
            problems.append(Problem(name, f"checksum mismatch in {key} (content changed after it was written)"))


# --------------------------------------------------------------------------- one shard

def check_shard(path: Path, manifest_sha: str | None = None) -> tuple[list[Problem], dict | None]:
    """Problems of one shard, and (when it is readable) {video_ids, num_clips, config}."""
    problems: list[Problem] = []
    name = path.name
    f = _open(path, problems, "shard")
    if f is None:
        return problems, None
    with f:
        values = _read_shard_datasets(f, name, problems)
        if values is None:
            return problems, None
        ids = decode_strings(values["index/video_id"])
        feats = values["features"]
        rows = feats.shape[0] if feats.ndim == 2 else -1
        _check_shapes(name, values, rows, int(f.attrs.get("dim", -1)), problems)
        _check_index(name, values, ids, rows, problems)
        _check_recorded_counts(name, f.attrs, values, ids, rows, problems)
        _check_finite(name, values, ids, problems)
        _check_origin(name, f.attrs, manifest_sha, problems)
        _compare_checksums(f, name, values, problems)
        config = f.attrs.get("config")
    return problems, {"video_ids": ids, "num_clips": rows, "config": config}


def _read_shard_datasets(f, name: str, problems: list[Problem]) -> dict | None:
    """Every dataset of the shard, or None (the reasons in ``problems``) when one is missing or unreadable."""
    if f.attrs.get("format") != FORMAT:
        problems.append(Problem(name, "not a videolm feature shard (format attribute missing)"))
        return None
    values = {}
    for key in SHARD_DATASETS:
        if key not in f:
            problems.append(Problem(name, f"dataset {key} missing"))
            continue
        try:
            values[key] = f[key][()]
        except (OSError, ValueError, KeyError) as exc:
            problems.append(Problem(name, f"dataset {key} unreadable ({str(exc)[:120]})"))
    return values if len(values) == len(SHARD_DATASETS) else None


def _check_shapes(name: str, values: dict, rows: int, dim: int, problems: list[Problem]) -> None:
    feats, times = values["features"], values["clip_times"]
    if feats.ndim != 2 or feats.shape[1] != dim:
        problems.append(Problem(name, f"features of shape {feats.shape}, expected (n, {dim})"))
    if times.shape != (rows, 2):
        problems.append(Problem(name, f"clip_times of shape {times.shape}, expected ({rows}, 2)"))


def _check_index(name: str, values: dict, ids: list[str], rows: int, problems: list[Problem]) -> None:
    offsets, counts, durations = values["index/offset"], values["index/num_clips"], values["index/duration"]
    if not (len(ids) == len(offsets) == len(counts) == len(durations)):
        problems.append(Problem(name, f"index arrays of different lengths: video_id {len(ids)}, offset "
                                      f"{len(offsets)}, num_clips {len(counts)}, duration {len(durations)}"))
    else:
        gap = _index_gap(ids, offsets.astype(np.int64), counts.astype(np.int64), rows)
        if gap is not None:
            problems.append(Problem(name, gap))
    if len(set(ids)) != len(ids):
        problems.append(Problem(name, "index: a video id appears twice"))


def _index_gap(ids: list[str], offsets: np.ndarray, counts: np.ndarray, rows: int) -> str | None:
    """The first way the videos' rows fail to tile ``features`` from row 0 in order, or None."""
    expected = 0
    for vid, a, n in zip(ids, offsets, counts):
        if n < 1:
            return f"index: video {vid!r} has {n} clips"
        if a != expected:
            return f"index: video {vid!r} starts at row {a}, expected {expected} (rows not contiguous)"
        if a + n > rows:
            return f"index: video {vid!r} rows [{a}, {a + n}) beyond the {rows} rows of features"
        expected = a + n
    if expected != rows:
        return f"index covers {expected} rows but features has {rows}"
    return None


def _check_recorded_counts(name: str, attrs, values: dict, ids: list[str], rows: int,
                           problems: list[Problem]) -> None:
    for attr, actual in (("num_videos", len(ids)), ("num_clips", rows),
                         ("num_failed", len(values["failures/video_id"]))):
        if attr in attrs and int(attrs[attr]) != actual:
            problems.append(Problem(name, f"attribute {attr}={int(attrs[attr])} but the datasets hold {actual}"))


def _check_finite(name: str, values: dict, ids: list[str], problems: list[Problem]) -> None:
    feats = values["features"]
    if feats.ndim == 2:
        bad = np.flatnonzero(~np.isfinite(feats).all(axis=1))
        if len(bad):
            video = _video_at(values["index/offset"].astype(np.int64), ids, int(bad[0]))
            problems.append(Problem(name, f"NaN/inf features in {len(bad)} row(s), first at row {bad[0]} "
                                          f"(video {video!r})"))
    if not np.isfinite(values["clip_times"]).all():
        problems.append(Problem(name, "NaN/inf clip times"))


def _video_at(offsets: np.ndarray, ids: list[str], row: int) -> str:
    i = int(np.searchsorted(offsets, row, side="right")) - 1
    return ids[i] if 0 <= i < len(ids) else "?"


def _check_origin(name: str, attrs, manifest_sha: str | None, problems: list[Problem]) -> None:
    """The shard was written from the recorded manifest, under its own name."""
    if manifest_sha is not None and attrs.get("manifest_sha256") not in (None, manifest_sha):
        problems.append(Problem(name, "written from a different manifest than extract_config.json records"))
    idx = attrs.get("shard_index")
    if idx is not None and shard_name(int(idx)) != name:
        problems.append(Problem(name, f"holds shard_index {int(idx)} (renamed or copied over?)"))


# --------------------------------------------------------------------------- codebook and token files

def _check_codebook(path: Path, report: VerifyReport) -> dict | None:
    problems = report.problems
    f = _open(path, problems, "codebook")
    if f is None:
        return None
    with f:
        if f.attrs.get("format") != CODEBOOK_FORMAT:
            problems.append(Problem(path.name, "not a videolm codebook"))
            return None
        attrs = plain_attrs(f.attrs)
        try:
            values = codebook_datasets(read_codebook_levels(f, int(attrs["levels"])))
        except (KeyError, OSError, ValueError) as exc:
            problems.append(Problem(path.name, f"incomplete or unreadable ({str(exc)[:120]})"))
            return None
        for key, arr in values.items():
            if key.endswith("/centroids"):
                if arr.ndim != 2 or arr.shape[1] != int(attrs.get("dim", arr.shape[-1])):
                    problems.append(Problem(path.name, f"{key} of shape {arr.shape}, dim {attrs.get('dim')}"))
                if not np.isfinite(arr).all():
                    problems.append(Problem(path.name, f"NaN/inf in {key}"))
        _compare_checksums(f, path.name, values, problems)
    return attrs


def _check_tokens(path: Path, codebook: dict, num_clips: int, report: VerifyReport) -> None:
    before = len(report.errors)
    f = _open(path, report.problems, "token file")
    if f is not None:
        with f:
            _check_token_file(f, path.name, codebook, num_clips, report.problems)
    if len(report.errors) > before:
        report.broken_tokens.append(path.name)


def _check_token_file(f, name: str, codebook: dict, num_clips: int, problems: list[Problem]) -> None:
    if f.attrs.get("format") != TOKENS_FORMAT or any(key not in f for key in TOKEN_DATASETS):
        problems.append(Problem(name, "not a complete videolm token file"))
        return
    if f.attrs.get("codebook_fingerprint") != codebook.get("fingerprint"):
        problems.append(Problem(name, "written with another codebook (fingerprint differs)"))
        return
    try:
        values = {key: f[key][()] for key in TOKEN_DATASETS}
    except (OSError, ValueError) as exc:
        problems.append(Problem(name, f"unreadable ({str(exc)[:120]})"))
        return
    tok = values["tokens"]
    if len(tok) != num_clips or len(values["paths"]) != num_clips:
        problems.append(Problem(name, f"{len(tok)} tokens but the shard has {num_clips} clips"))
    vocab = int(codebook.get("vocab_size", 0))
    if len(tok) and (tok.min() < 0 or tok.max() >= vocab):
        problems.append(Problem(name, f"word ids outside [0, {vocab})"))
    _compare_checksums(f, name, values, problems)


# --------------------------------------------------------------------------- the directory

def verify_directory(directory: str | os.PathLike) -> VerifyReport:
    d = Path(directory)
    if not d.is_dir():
        raise VerifyError(f"{d}: not a directory")
    report = VerifyReport(str(d))
    recorded = read_extract_config(d)
    key = (recorded or {}).get("key", {})
    if recorded is None:
        report.problems.append(Problem(EXTRACT_CONFIG_NAME, "missing or unreadable; cannot tell which shards "
                                                            "should exist", "warning"))
    paths = list_shards(d)
    if not paths and recorded is None:
        raise VerifyError(f"{d}: no feature shards (shard_*.h5) and no {EXTRACT_CONFIG_NAME}")
    readable = _check_shards(paths, key.get("manifest_sha256"), report)
    expected = planned_shard_count(key)
    if expected is not None:
        _check_shard_set(paths, expected, report)
    _check_videos_unique(readable, report)
    _check_configs_agree(readable, report)
    _note_leftovers(d, report)
    _check_visual_words(d, paths, readable, report)
    report.broken_shards = sorted(set(report.broken_shards))
    return report


def _check_shards(paths: list[Path], manifest_sha: str | None, report: VerifyReport) -> dict[str, dict]:
    """Check every shard; returns what ``check_shard`` read of each readable one, by file name."""
    report.shards = len(paths)
    readable: dict[str, dict] = {}
    for p in paths:
        problems, info = check_shard(p, manifest_sha)
        report.problems += problems
        if _has_error(problems):
            report.broken_shards.append(shard_index(p))
        else:
            report.shards_ok += 1
        if info is not None:
            readable[p.name] = info
            report.clips += info["num_clips"]
    return readable


def _check_shard_set(paths: list[Path], expected: int, report: VerifyReport) -> None:
    """Exactly the shards the recorded extraction writes are present."""
    present = {p.name for p in paths}
    for s in range(expected):
        if shard_name(s) not in present:
            report.problems.append(Problem(shard_name(s), f"missing (the directory should hold {expected} "
                                                          "shards; extraction unfinished or file deleted)"))
            report.broken_shards.append(s)
    for p in paths:
        if shard_index(p) >= expected:
            report.problems.append(Problem(p.name, f"beyond the {expected} shards the config implies"))


def _check_videos_unique(readable: dict[str, dict], report: VerifyReport) -> None:
    seen: dict[str, str] = {}
    for name, info in readable.items():
        for vid in info["video_ids"]:
            if vid in seen:
                report.problems.append(Problem(name, f"video {vid!r} is also in {seen[vid]}"))
            seen[vid] = name


def _check_configs_agree(readable: dict[str, dict], report: VerifyReport) -> None:
    """Features of one directory must be comparable: one encoder, weights and sampling."""
    configs: dict[str, list[str]] = {}
    for name, info in readable.items():
        try:
            config = json.loads(info["config"]) if info["config"] is not None else {}
        except ValueError:
            report.problems.append(Problem(name, "config attribute is not valid JSON"))
            continue
        configs.setdefault(config_key(config), []).append(name)
    if len(configs) > 1:
        report.problems.append(Problem(".", "shards were written with different encoders/configs: "
                                            + "; ".join(f"{v[:3]} {k}" for k, v in configs.items())))


def _note_leftovers(d: Path, report: VerifyReport) -> None:
    for p in unfinished_files(d):
        report.problems.append(Problem(p.name, "leftover of an interrupted run (removed when the job resumes)",
                                       "warning"))
    for p in set_aside_files(d):
        report.problems.append(Problem(p.name, "damaged shard set aside by an earlier run; safe to delete",
                                       "warning"))


def _check_visual_words(d: Path, paths: list[Path], readable: dict[str, dict], report: VerifyReport) -> None:
    """After ``videolm quantize``: the codebook, and a token file for every shard that uses it."""
    cb_path = d / CODEBOOK_NAME
    token_files = list_token_files(d)
    report.token_files = len(token_files)
    if not cb_path.exists():
        if token_files:
            report.problems.append(Problem(token_files[0].name, f"{len(token_files)} token file(s) but no "
                                                                f"{CODEBOOK_NAME}; they cannot be used", "warning"))
        return
    report.has_codebook = True
    codebook = _check_codebook(cb_path, report)
    if codebook is None:
        return
    for p in paths:
        tp = token_path(p)
        info = readable.get(p.name)
        if not tp.exists():
            report.problems.append(Problem(tp.name, "missing: the directory has a codebook "
                                                    "(re-run `videolm quantize`)"))
            report.broken_tokens.append(tp.name)
        elif info is not None:
            _check_tokens(tp, codebook, info["num_clips"], report)


# --------------------------------------------------------------------------- repair

def recorded_extract_config(directory: str | os.PathLike, workers: int | None = None):
    """The ExtractConfig the directory was written with (extract_config.json + a readable shard's config)."""
    from ..extract.config import ExtractConfig
    from ..config import from_dict

    d = Path(directory)
    recorded = read_extract_config(d)
    if recorded is None:
        raise VerifyError(f"{d}/{EXTRACT_CONFIG_NAME} is missing or unreadable: cannot re-extract with the "
                          "recorded configuration")
    key = recorded["key"]
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    base: dict = {}
    for p in list_shards(d):  # batch size, backend, device: only the shards record them
        problems, info = check_shard(p)
        if info is not None and info["config"] and not _has_error(problems):
            base = {k: v for k, v in json.loads(info["config"]).items() if k in fields}
            break
    sampling = key.get("sampling") or {}
    base.update({"encoder": key["encoder"], "weights": key.get("weights"), "shard_size": int(key["shard_size"]),
                 **{k: sampling[k] for k in ("fps", "frames_per_clip", "clip_stride", "short_side", "crop")
                    if k in sampling}})
    if workers is not None:
        base["workers"] = workers
    return from_dict(ExtractConfig, base), key


@dataclass
class RepairResult:
    before: VerifyReport
    after: VerifyReport
    shards_reextracted: list[str] = field(default_factory=list)
    token_files_removed: list[str] = field(default_factory=list)
    retokenised: bool = False
    notes: list[str] = field(default_factory=list)


def repair_directory(directory: str | os.PathLike, manifest: str | os.PathLike | None, workers: int | None = None,
                     progress: bool = False) -> RepairResult:
    """Delete what verify found broken, re-extract it with the recorded config, re-tokenise, verify again."""
    d = Path(directory)
    before = verify_directory(d)
    result = RepairResult(before, before)
    if before.ok:
        return result
    if before.broken_shards:
        from ..extract.job import file_sha256, run_extract

        if manifest is None:
            raise VerifyError("--repair must re-extract "
                              f"{len(before.broken_shards)} shard(s): pass --manifest with the manifest "
                              "the directory was extracted from")
        cfg, key = recorded_extract_config(d, workers)
        sha = file_sha256(manifest)
        if sha != key.get("manifest_sha256"):
            raise VerifyError(f"{manifest}: sha256 {sha[:12]}... differs from the manifest this directory was "
                              f"extracted from ({str(key.get('manifest_sha256'))[:12]}...); give that manifest")
        for s in before.broken_shards:
            p = d / shard_name(s)
            for victim in (p, token_path(p)):
                if victim.exists():
                    victim.unlink()
                    if victim == token_path(p):
                        result.token_files_removed.append(victim.name)
            result.shards_reextracted.append(p.name)
        run_extract(manifest, d, cfg, split=key.get("split") or None, progress=progress)
    for name in before.broken_tokens:
        if (d / name).exists():
            (d / name).unlink()
            result.token_files_removed.append(name)
    if result.token_files_removed or before.broken_tokens:
        result.retokenised = _retokenise(d, result)
    result.after = verify_directory(d)
    return result


def _retokenise(d: Path, result: RepairResult) -> bool:
    """Rewrite missing token files with the existing codebook (same settings: nothing is refitted)."""
    from ..config import from_dict
    from ..quantize.kmeans import QuantizeConfig
    from ..quantize.job import QuantizeError, run_quantize

    try:
        attrs = read_codebook_attrs(d / CODEBOOK_NAME)
        if attrs is None:
            return False
        cfg = from_dict(QuantizeConfig, json.loads(attrs["config"]))
        run_quantize(d, cfg, progress=False)
        return True
    except (ShardError, QuantizeError, KeyError, ValueError) as exc:
        result.notes.append(f"could not re-tokenise with the existing codebook ({exc}); "
                            "run `videolm quantize` again with the settings it was fitted with")
        return False
