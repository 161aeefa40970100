"""A local text file as one document, tokenized piece by piece: the tokens of the whole file, in bounded memory and
only as far as they are needed (a 21 MB file tokenized whole took 22 s and 2.9 GB for a calibration of 8k tokens)."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from kvconvert.errors import KVConvertError

PIECE = 1 << 20
"""Characters per piece at most; the first is `FIRST`, and each next one twice the last, so that a calibration that
needs a few thousand tokens reads tens of kilobytes of a large file."""
FIRST = 1 << 16
MARGIN = 2048
"""Characters of context tokenized on each side of a piece and then dropped: a tokenizer decides a token from its
neighbourhood (the word, the run of spaces, the characters around it), which the margin holds whole."""
_LINE = re.compile(r"\n(?=\S)")
_WORD = re.compile(r"(?<=\S) (?=\S)")


@dataclass(frozen=True)
class TextFile:
    """A local UTF-8 text file, read with universal newlines (as `datasets`' `text` loader with
    sample_by="document" reads it)."""

    path: Path

    def read(self) -> str:
        """The whole file as one string."""
        try:
            return self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise self._not_utf8() from None

    def has_text(self) -> bool:
        """Whether the file holds anything but whitespace (reads only up to its first other character)."""
        return any(chunk.strip() for chunk in self.chunks(1 << 12))

    def chunks(self, size: int = FIRST) -> Iterator[str]:
        """The file's text in chunks of at most `size` characters."""
        with self.path.open(encoding="utf-8") as f:
            while True:
                try:
                    chunk = f.read(size)
                except UnicodeDecodeError:
                    raise self._not_utf8() from None
                if not chunk:
                    return
                yield chunk

    def _not_utf8(self) -> KVConvertError:
        return not_utf8(self.path)


def not_utf8(path: Path) -> KVConvertError:
    """The error for a dataset file that is not UTF-8, naming its first bad byte."""
    return KVConvertError(f"dataset file {path} is not UTF-8 text (byte {first_bad_byte(path)}); convert it to UTF-8")


def first_bad_byte(path: Path) -> int | None:
    """The offset of the first byte of `path` that is not valid UTF-8, None if there is none."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return done - pending + exc.start
            done += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return done - len(decoder.getstate()[0]) + exc.start
    return None


def file_tokens(tokenizer, doc: TextFile, piece: int = PIECE, margin: int = MARGIN) -> Iterator[list[int]]:
    """The token ids of `doc` read whole (`tokenizer(text, add_special_tokens=False)`), as consecutive lists.

    Each piece (FIRST characters, then twice as many each time up to `piece`; it ends at a word boundary, `_cut`)
    is tokenized with `margin` characters of context on each side, and a token belongs to the piece that holds its
    first character. Two neighbouring pieces must also give the same tokens within `margin / 2` of their cut, or
    they are tokenized again as one piece. A tokenizer without character offsets (a slow one) gets the whole text.
    """
    if not getattr(tokenizer, "is_fast", False):
        yield tokenizer(doc.read(), add_special_tokens=False)["input_ids"]
        return
    text, reach, size = _Text(doc.chunks(FIRST)), max(1, margin // 2), min(piece, FIRST)
    with closing(text):
        pending = _encode(tokenizer, text, 0, _cut(text, 0, size), margin)
        while not text.ends_at(pending.end):
            size = min(piece, 2 * size)
            after = _encode(tokenizer, text, pending.end, _cut(text, pending.end, size), margin)
            if pending.near(pending.end, reach) == after.near(pending.end, reach):
                yield pending.kept()
                pending = after
                text.forget_before(pending.start - margin)
            else:
                pending = _encode(tokenizer, text, pending.start, after.end, margin)
        yield pending.kept()


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    tokens: list[tuple[int, int]]  # (position of the first character in the file, id), window tokens in order

    def kept(self) -> list[int]:
        return [i for at, i in self.tokens if self.start <= at < self.end]

    def near(self, cut: int, reach: int) -> list[tuple[int, int]]:
        return [(at, i) for at, i in self.tokens if cut - reach <= at < cut + reach]


def _encode(tokenizer, text: _Text, start: int, end: int, margin: int) -> _Piece:
    """The tokens of text[start - margin : end + margin], placed in the file."""
    lo = max(0, start - margin)
    enc = tokenizer(text.span(lo, end + margin), add_special_tokens=False, return_offsets_mapping=True)
    at = [lo + a for a, _ in enc["offset_mapping"]]
    return _Piece(start, end, list(zip(at, enc["input_ids"], strict=True)))


def _cut(text: _Text, start: int, size: int) -> int:
    """Where the piece from `start` ends: at the first boundary `size` characters on or later (after a line break
    followed by text, else before a space between two words: where the split patterns of byte-level tokenizers and
    the '▁' of SentencePiece ones start a new word), or at the end of the file. It is never cut inside a run of
    spaces or a long word, whose tokens a BPE decides from the whole run."""
    pos, step = start + size, min(size, 256)
    while True:
        ahead = text.span(pos, pos + step)
        if line := _LINE.search(ahead):
            return pos + line.end()
        if word := _WORD.search(ahead):
            return pos + word.start()
        if text.ends_at(pos + len(ahead)):
            return min(pos + len(ahead), text.known)
        pos, step = pos + len(ahead), min(size, 2 * step)


class _Text:
    """A sliding view of a text read in chunks: characters are read when asked for and forgotten when told."""

    def __init__(self, chunks: Iterator[str]):
        self._chunks, self._buf, self._base, self._ended = chunks, "", 0, False

    @property
    def known(self) -> int:
        """How many characters have been read."""
        return self._base + len(self._buf)

    def span(self, a: int, b: int) -> str:
        """Characters a..b (fewer at the end of the file); `a` must not have been forgotten."""
        while not self._ended and self.known < b:
            chunk = next(self._chunks, "")
            self._ended = not chunk
            self._buf += chunk
        return self._buf[a - self._base : b - self._base]

    def ends_at(self, position: int) -> bool:
        """Whether the file ends at `position` (read so far up to there)."""
        self.span(position, position + 1)
        return self._ended and position >= self.known

    def forget_before(self, position: int) -> None:
        drop = max(0, position - self._base)
        self._buf, self._base = self._buf[drop:], self._base + drop

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
