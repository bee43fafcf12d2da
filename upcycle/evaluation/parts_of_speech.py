"""Kind of each token in running text: punctuation, word piece, or the part of speech of the word it starts.

The MoE++ paper compares FFN experts per token across kinds of token (verbs use the most, word pieces the fewest).
A token's kind here comes from the text around it, rebuilt by decoding the block token by token:
- punctuation: no letter or digit in the token (whitespace included), as in `token_kinds`;
- word piece: its first letter or digit continues a word begun by an earlier token (a sub-word continuation);
- otherwise the token starts a word: that word's part of speech when a tagger is installed, "word" without one.

The tagger is HanTa (the Hanover Tagger, a dependency of upcycle: pure Python, LGPL-3.0, its English model ships
inside the wheel, so nothing is downloaded at run time). It tags words with the BNC's CLAWS C5 tags, grouped
here into coarse parts of speech (`C5_GROUPS`). Words are tagged in runs between sentence punctuation, so a
word's tag depends on its neighbours as a tagger's should. Without HanTa the kinds are punctuation, word piece and
word. nltk's tagger needs its data downloaded at run time and spaCy's models are not on PyPI, so neither is used.
"""

import re

import torch

TAGGER_NAME = "HanTa (Hanover Tagger) English model, CLAWS C5 tags"
WORD = re.compile(r"[^\W_]+")  # letters and digits: what a tagger sees as one word
SENTENCE_BREAK = re.compile(r"[.!?;:\n]")  # the tagger's runs of words end here
# CLAWS C5 tag prefixes -> coarse part of speech (first match wins; anything else is "other")
C5_GROUPS = (
    (("NN", "NP"), "noun"),
    (("VV", "VB", "VD", "VH", "VM"), "verb"),
    (("AJ",), "adjective"),
    (("AV",), "adverb"),
    (("PN", "DPS"), "pronoun"),
    (("AT", "DT"), "determiner"),
    (("PR",), "preposition"),
    (("CJ",), "conjunction"),
    (("CRD", "ORD"), "number"),
)
BASE_KINDS = ("punctuation", "word piece", "word")


def load_tagger():
    """The HanTa English tagger, or None when HanTa is not installed."""
    try:
        from HanTa import HanoverTagger
    except ImportError:
        return None
    return HanoverTagger.HanoverTagger("morphmodel_en.pgz")


def coarse_part_of_speech(tag: str) -> str:
    for prefixes, group in C5_GROUPS:
        if tag.startswith(prefixes):
            return group
    return "other"


def tag_words(text: str, tagger) -> list[tuple[int, int, str]]:
    """(start, end, coarse part of speech) of every word of `text` (letters and digits), tagged in runs."""
    spans = [(match.start(), match.end()) for match in WORD.finditer(text)]
    if tagger is None:
        return [(start, end, "word") for start, end in spans]
    breaks = [match.start() for match in SENTENCE_BREAK.finditer(text)]
    runs: list[list[tuple[int, int]]] = [[]]
    position = 0
    for start, end in spans:
        while position < len(breaks) and breaks[position] < start:  # a sentence break before this word
            position += 1
            if runs[-1]:
                runs.append([])
        runs[-1].append((start, end))
    tagged = []
    for run in runs:
        if not run:
            continue
        words = [text[start:end] for start, end in run]
        tags = [tag for _, _, tag in tagger.tag_sent(words, taglevel=1)]
        tagged += [(start, end, coarse_part_of_speech(tag)) for (start, end), tag in zip(run, tags)]
    return tagged


def block_token_kinds(token_texts: list[str], tagger) -> list[str]:
    """The kind of each token of one block, from the tokens' decoded texts (see the module docstring)."""
    text = "".join(token_texts)
    offsets = []  # (start, end) of each token in `text`
    position = 0
    for piece in token_texts:
        offsets.append((position, position + len(piece)))
        position += len(piece)
    word_at = {}  # character offset of a word's first character -> its part of speech
    inside_word = bytearray(len(text))  # 1 where a character continues a word
    for start, end, kind in tag_words(text, tagger):
        word_at[start] = kind
        inside_word[start + 1:end] = b"\x01" * (end - start - 1)
    kinds = []
    for (start, end), piece in zip(offsets, token_texts):
        first = next((start + i for i, character in enumerate(piece) if character.isalnum()), None)
        if first is None:
            kinds.append("punctuation")
        elif inside_word[first]:
            kinds.append("word piece")
        else:
            kinds.append(word_at.get(first, "word"))
    return kinds


def token_kinds_of_blocks(token_ids: torch.Tensor, block_size: int, tokenizer, tagger) -> list[str]:
    """token_ids (n * block_size,) in block order -> the kind of every token (blocks tagged one by one)."""
    vocabulary = {}
    kinds = []
    for block in token_ids.reshape(-1, block_size).tolist():
        texts = []
        for token_id in block:
            if token_id not in vocabulary:
                vocabulary[token_id] = tokenizer.decode([token_id])
            texts.append(vocabulary[token_id])
        kinds += block_token_kinds(texts, tagger)
    return kinds
