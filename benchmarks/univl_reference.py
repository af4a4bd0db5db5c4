"""Build microsoft/UniVL's own reference model, with random weights at a small size.

This lets a test compare ``videolm``'s re-implementation of UniVL against the
original code: build the reference here, load ``univl.pretrained.bin`` (the
reference's ``state_dict``) into our model, and compare ``reference_outputs``.

No UniVL code is copied into this file. At run time UniVL's ``modules/`` package
is copied from a local checkout (a normal directory, or a bare git directory
read with ``git archive``) into a scratch directory, and imported from there.
UniVL's ``file_utils`` imports ``boto3``, ``botocore`` and ``requests``: small
stand-in packages that can do nothing are written next to it, so the import
succeeds offline and nothing can touch the network. Afterwards ``sys.path``
and ``sys.modules`` are restored; the model object keeps working.

Run ``python benchmarks/univl_reference.py [CHECKOUT]`` for a smoke test.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

DEFAULT_MIRROR = Path("/work/.mirror/microsoft+UniVL/repo")

SMALL = dict(hidden=64, heads=4, intermediate=256, text_layers=2, visual_layers=2, cross_layers=1,
             decoder_layers=1, vocab=30522, text_positions=64, visual_positions=16, cross_positions=80,
             video_dim=48, type_vocab=2)

_OFFLINE = "raise RuntimeError('offline stand-in written by benchmarks/univl_reference.py')\n"
_STAND_INS = {
    "boto3/__init__.py": f"def resource(*args, **kwargs):\n    {_OFFLINE}\nclient = resource\n",
    "botocore/__init__.py": "",
    "botocore/exceptions.py": "class ClientError(Exception):\n    response = {'Error': {'Code': '0'}}\n",
    "requests/__init__.py": f"def get(*args, **kwargs):\n    {_OFFLINE}\nhead = get\n",
}
_TQDM_STAND_IN = {"tqdm/__init__.py": (
    "class tqdm:\n    def __init__(self, iterable=None, *args, **kwargs):\n        self.iterable = iterable\n"
    "    def __iter__(self):\n        return iter(self.iterable)\n"
    "    def update(self, n=1):\n        pass\n    def close(self):\n        pass\n")}


def _git(bare: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["git", "-c", "safe.directory=*", f"--git-dir={bare}", *args]
    return subprocess.run(cmd, capture_output=True, check=False)


def _is_checkout(path: Path) -> bool:
    return (path / "modules" / "modeling.py").is_file()


def _is_bare(path: Path) -> bool:
    if not ((path / "HEAD").is_file() and (path / "objects").is_dir()) or shutil.which("git") is None:
        return False
    return _git(path, "cat-file", "-e", "HEAD:modules/modeling.py").returncode == 0


def find_checkout(explicit: str | None = None) -> Path | None:
    """The UniVL source to use: ``explicit``, else ``$UNIVL_CHECKOUT``, else the mirror.

    The first of these that is given is the only one considered (an explicit or
    environment path that is not a UniVL checkout gives None, not a fallback).
    """
    chosen = explicit or os.environ.get("UNIVL_CHECKOUT") or DEFAULT_MIRROR
    path = Path(chosen).expanduser()
    return path if path.is_dir() and (_is_checkout(path) or _is_bare(path)) else None


def _materialise(checkout: Path, root: Path) -> None:
    """Copy UniVL's ``modules/`` package into ``root/modules`` and add the stand-ins."""
    if _is_checkout(checkout):
        shutil.copytree(checkout / "modules", root / "modules", ignore=shutil.ignore_patterns("__pycache__"))
    elif _is_bare(checkout):
        proc = _git(checkout, "archive", "--format=tar", "HEAD", "modules")
        if proc.returncode != 0:
            raise RuntimeError(f"git archive failed: {proc.stderr.decode(errors='replace')}")
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, **kwargs)
    else:
        raise FileNotFoundError(f"{checkout} is neither a UniVL checkout nor a bare git dir of one")
    stand_ins = dict(_STAND_INS)
    if importlib.util.find_spec("tqdm") is None:
        stand_ins.update(_TQDM_STAND_IN)
    for rel, text in stand_ins.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@contextlib.contextmanager
def _isolated_import(root: Path, names: tuple[str, ...]):
    """Import from ``root`` first; afterwards drop what was imported and restore ``sys``."""
    def owned(name: str) -> bool:
        return any(name == n or name.startswith(n + ".") for n in names)

    saved = {n: m for n, m in sys.modules.items() if owned(n)}
    for n in saved:
        del sys.modules[n]
    old_path = list(sys.path)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    log = logging.getLogger("modules.modeling")  # update_attr logs every layer-count change
    old_level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old_level)
        for n in [n for n in sys.modules if owned(n)]:
            del sys.modules[n]
        sys.modules.update(saved)
        sys.path[:] = old_path
        sys.path_importer_cache.pop(str(root), None)
        importlib.invalidate_caches()


def build_reference(checkout: Path, workdir: Path, sizes: dict = SMALL, seed: int = 0):
    """Build ``modules.modeling.UniVL`` (stage two, pretraining heads) with random weights.

    Returns ``(model, state_dict_path)``; the state dict is at ``workdir/univl.pretrained.bin``.
    """
    s = {**SMALL, **sizes}
    checkout, workdir = Path(checkout), Path(workdir)
    root = workdir / "univl_ref"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _materialise(checkout, root)
    with _isolated_import(root, ("modules", "boto3", "botocore", "requests", "tqdm")):
        modeling = importlib.import_module("modules.modeling")
        common = dict(hidden_size=s["hidden"], num_attention_heads=s["heads"], intermediate_size=s["intermediate"])
        bert = modeling.BertConfig(s["vocab"], num_hidden_layers=s["text_layers"],
                                   max_position_embeddings=s["text_positions"], type_vocab_size=s["type_vocab"], **common)
        # The visual "vocab" is the feature size: embeddings.word_embeddings is Linear(video_dim, hidden).
        visual = modeling.VisualConfig(s["video_dim"], num_hidden_layers=s["visual_layers"],
                                       max_position_embeddings=s["visual_positions"], **common)
        visual.type_vocab_size = s["type_vocab"]  # as VisualConfig.get_config sets it (unused)
        # The cross encoder has no word embeddings; its json uses vocab_size = hidden_size.
        cross = modeling.CrossConfig(s["hidden"], num_hidden_layers=s["cross_layers"],
                                     max_position_embeddings=s["cross_positions"], type_vocab_size=s["type_vocab"], **common)
        # The decoder shares BERT's word and position embeddings, so max_target_embeddings only bounds max_words.
        decoder = modeling.DecoderConfig(s["vocab"], num_hidden_layers=s["decoder_layers"], type_vocab_size=s["type_vocab"],
                                         max_target_embeddings=s["text_positions"], num_decoder_layers=s["decoder_layers"],
                                         **common)
        task = argparse.Namespace(
            max_words=s["text_positions"], max_frames=s["visual_positions"], video_dim=s["video_dim"],
            stage_two=True, do_pretrain=True, train_sim_after_cross=False, use_mil=False, task_type="retrieval",
            batch_size=2, n_gpu=1, n_pair=1, margin=0.1, negative_weighting=1, hard_negative_rate=0.5,
            text_num_hidden_layers=s["text_layers"], visual_num_hidden_layers=s["visual_layers"],
            cross_num_hidden_layers=s["cross_layers"], decoder_num_hidden_layers=s["decoder_layers"],
            local_rank=0)
        with torch.random.fork_rng(devices=[]):  # seeded, but the caller's RNG is left as it was
            torch.manual_seed(seed)
            model = modeling.UniVL(bert, visual, cross, decoder, task)
    model.eval()
    counts = {"text_layers": len(model.bert.encoder.layer), "visual_layers": len(model.visual.encoder.layer),
              "cross_layers": len(model.cross.encoder.layer), "decoder_layers": len(model.decoder.decoder.layer)}
    wrong = {k: v for k, v in counts.items() if v != s[k]}
    if wrong:
        raise RuntimeError(f"UniVL built with layer counts {wrong}, asked for {s}")
    path = workdir / "univl.pretrained.bin"
    torch.save(model.state_dict(), path)
    return model, path


def reference_outputs(model, input_ids, attention_mask, video, video_mask, caption_ids, caption_mask) -> dict[str, torch.Tensor]:
    """Run the reference's own methods (eval mode, no grad, fp32, token types all zero)."""
    device = next(model.parameters()).device
    input_ids, attention_mask, video_mask, caption_ids, caption_mask = (
        t.to(device=device, dtype=torch.long) for t in (input_ids, attention_mask, video_mask, caption_ids, caption_mask))
    video = video.to(device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            token_type_ids = torch.zeros_like(input_ids)
            # shaped=False: applies model.normalize_video (LayerNorm over video_dim) as UniVL's eval code does.
            text, visual = model.get_sequence_visual_output(input_ids, token_type_ids, attention_mask, video, video_mask)
            cross, pooled, _ = model._get_cross_output(text, visual, attention_mask, video_mask)
            logits, _ = model._get_decoder_score(text, visual, input_ids, attention_mask, video_mask,
                                                 caption_ids, caption_mask, shaped=True)
            joint = model.get_similarity_logits(text, visual, attention_mask, video_mask, shaped=True, _pretrain_joint=True)
            align = model._cross_similarity(text, visual, attention_mask, video_mask)
    finally:
        model.train(was_training)
    return {"text": text, "visual": visual, "cross": cross, "pooled": pooled, "decoder_logits": logits,
            "joint_similarity": joint, "cross_similarity": align}


if __name__ == "__main__":
    import tempfile

    found = find_checkout(sys.argv[1] if len(sys.argv) > 1 else None)
    if found is None:
        sys.exit("no UniVL checkout found (pass a path or set UNIVL_CHECKOUT)")
    with tempfile.TemporaryDirectory(prefix="univl_ref_") as tmp:
        model, sd_path = build_reference(found, Path(tmp))
        print(f"checkout: {found}\nstate dict: {sd_path} ({sd_path.stat().st_size} bytes)")
        g = torch.Generator().manual_seed(1)
        B, L, T, Lc = 3, 12, 8, 10
        ids = torch.randint(1, SMALL["vocab"], (B, L), generator=g)
        amask = torch.ones(B, L, dtype=torch.long)
        amask[1, 8:] = 0
        ids[1, 8:] = 0
        vid = torch.randn(B, T, SMALL["video_dim"], generator=g)
        vmask = torch.ones(B, T, dtype=torch.long)
        vmask[2, 5:] = 0
        cap = torch.randint(1, SMALL["vocab"], (B, Lc), generator=g)
        cmask = torch.ones(B, Lc, dtype=torch.long)
        cmask[0, 6:] = 0
        out = reference_outputs(model, ids, amask, vid, vmask, cap, cmask)
        for k, v in out.items():
            print(f"{k:18s} {tuple(v.shape)} finite={bool(torch.isfinite(v).all())}")
        print("joint_similarity:\n", out["joint_similarity"])
        print("cross_similarity:\n", out["cross_similarity"])
        sd = model.state_dict()
        print(f"\n{len(sd)} state-dict keys:")
        for k, v in sd.items():
            print(f"  {k} {tuple(v.shape)}")
        groups: dict[int, list[str]] = {}
        for k, v in sd.items():
            groups.setdefault(v.data_ptr(), []).append(k)
        print("\ntied (same storage):")
        for keys in groups.values():
            if len(keys) > 1:
                print("  " + " = ".join(keys))
        left = sorted(n for n in sys.modules if n.split(".")[0] in ("modules", "boto3", "botocore", "requests"))
        print("\nleft in sys.modules:", left, "| univl_ref on sys.path:", any("univl_ref" in p for p in sys.path))
