"""The one input pipeline: texts, clip features and visual words -> the tensors every model call takes.

Training (``pretrain.collate``), retrieval evaluation, re-ranking and (later)
captioning all build their model inputs here, so a tokenizer setting, the clip
padding or the visual-word id rule cannot drift between them.

Visual words: the codebook's word ``w`` is model id ``w + VISUAL_TOKEN_OFFSET``;
ids below the offset are the special tokens, in ``VISUAL_SPECIAL_TOKENS`` order
(the codebook records both, ``quantize.job`` writes them from here).
"""

from __future__ import annotations

VISUAL_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VISUAL_PAD_ID = VISUAL_SPECIAL_TOKENS.index("[PAD]")
VISUAL_MASK_ID = VISUAL_SPECIAL_TOKENS.index("[MASK]")
VISUAL_TOKEN_OFFSET = len(VISUAL_SPECIAL_TOKENS)
