"""A local text file is tokenized piece by piece, only as far as needed, into the tokens of the file read whole."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconvert.checkpoint import resolve
from kvconvert.errors import KVConvertError
from kvconvert.modeling import load_tokenizer
from kvconvert.textdata import iter_documents, iter_texts, token_stream, token_windows
from kvconvert.textfile import TextFile, file_tokens, first_bad_byte

WORDS = ["cache", "head", " ", "  ", "\n", "\n\n", "\r\n", "\r", "\t", "ünï", "中文", "😀", "key", "value", "    ", "x"]


def metaspace_tokenizer():
    """A SentencePiece-style BPE (Metaspace, a '▁' put before the first word of every input: Llama 2, Gemma),
    where a piece tokenized on its own differs from the same text inside the file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["".join(WORDS[i % len(WORDS)] for i in range(k, k + 40)) for k in range(200)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def space_run_tokenizer():
    """A byte-level BPE trained on runs of up to 40 spaces: it holds tokens of many spaces, so how a long run splits
    depends on where the run starts and ends (Qwen2.5's tokenizer does the same on indented code)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = ["key", "value", "\n"]
    lines = ["".join(rng.choice(words) + " " * rng.randint(1, 40) for _ in range(50)) for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tokenizers(tiny_llama):
    return {
        "byte-level": load_tokenizer(resolve(str(tiny_llama))),
        "metaspace": metaspace_tokenizer(),
        "space-runs": space_run_tokenizer(),
    }


def whole(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def stitched(tok, path, piece, margin):
    return [i for ids in file_tokens(tok, TextFile(path), piece, margin) for i in ids]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=0, max_size=400),
    piece=st.integers(1, 60),
    margin=st.integers(8, 32),
)
def test_pieces_give_the_tokens_of_the_whole_file(tokenizers, tmp_path, words, piece, margin):
    """Whatever the cuts (inside a word or a run of spaces, with margins of a few words), every token comes out once;
    a seam whose tokens depend on more context than the margin (a long run of spaces) is found and tokenized whole."""
    path = tmp_path / "t.txt"
    path.write_bytes("".join(words).encode())
    text = TextFile(path).read()
    assert "".join(TextFile(path).chunks(piece)) == text  # universal newlines, a '\r\n' split between two reads
    for tok in tokenizers.values():
        assert stitched(tok, path, piece, margin) == whole(tok, text)


def test_long_runs_and_words_are_never_cut(tokenizers, tmp_path):
    """Runs of spaces and words far longer than a piece and its margin: a BPE decides their tokens from the whole
    run, so the pieces end only at word boundaries (cut every 100 characters instead, the `space-runs` tokenizer
    gives other tokens, and the seams do not show it)."""
    path = tmp_path / "t.txt"
    path.write_text("key" + " " * 3001 + "value\n" + " " * 777 + "x" * 2500 + " cache\n" + ("head key " * 300))
    for tok in tokenizers.values():
        assert stitched(tok, path, 100, 16) == whole(tok, path.read_text())


def test_a_piece_tokenized_alone_would_differ_so_the_seams_matter(tokenizers, tmp_path):
    """The property above can fail: tokenizing the pieces on their own gives other tokens (Metaspace's '▁')."""
    path = tmp_path / "t.txt"
    path.write_text("cache head key\nvalue cache head\nkey value\n" * 20)
    text = path.read_text()
    tok = tokenizers["metaspace"]
    alone = [i for k in range(0, len(text), 50) for i in whole(tok, text[k : k + 50])]
    assert alone != whole(tok, text) == stitched(tok, path, 50, 8)


def test_only_the_text_that_is_needed_is_read(tokenizers, tmp_path, monkeypatch):
    """A calibration of a few windows from a large file reads its first pieces (64 + 128 KiB), not the file."""
    path = tmp_path / "big.txt"
    path.write_text("cache head key value\n" * 200_000)  # 4.2 M characters
    read = []
    chunks = TextFile.chunks

    def counting(self, size):
        for chunk in chunks(self, size):
            read.append(len(chunk))
            yield chunk

    monkeypatch.setattr(TextFile, "chunks", counting)
    tok = tokenizers["byte-level"]
    windows = token_windows(tok, iter_documents(str(path)), 4, 64, "big")
    assert windows.shape == (4, 64)
    assert sum(read) <= 320 << 10
    assert windows[:, 1:].flatten().tolist() == whole(tok, "cache head key value\n" * 100)[: 4 * 63]


def test_documents_and_eos_as_before(tokenizers, tmp_path):
    """A file, then a string: the file's tokens, EOS, the string's tokens, EOS; cut at `need`; fewer if short."""
    path = tmp_path / "a.txt"
    path.write_text("key value\n" * 300)
    tok = tokenizers["byte-level"]
    want = [*whole(tok, path.read_text()), tok.eos_token_id, *whole(tok, "cache head"), tok.eos_token_id]
    docs = [TextFile(path), "cache head"]
    assert token_stream(tok, docs, len(want) + 10).tolist() == want
    assert token_stream(tok, docs, 25).tolist() == want[:25]
    assert token_stream(tok, [], 5).tolist() == []


def test_blank_and_non_utf8_files(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\n\t")
    assert list(iter_documents(str(tmp_path / "blank.txt"))) == []
    bad = tmp_path / "late.txt"
    bad.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() + b"b" * 1000 + b"caf\xe9")  # é across the 1 MiB block
    assert first_bad_byte(bad) == (1 << 20) + 1 + 1000 + 3
    assert first_bad_byte(tmp_path / "blank.txt") is None
    with pytest.raises(KVConvertError, match=f"not UTF-8 text \\(byte {(1 << 20) + 1004}\\)"):
        list(iter_texts(str(bad)))
    mid = tmp_path / "mid.txt"
    mid.write_bytes(b"a" * 10 + b"\xff" + b"b" * 10)  # a byte that starts no character
    assert first_bad_byte(mid) == 10
    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"abc" + "é".encode()[:1])  # a file cut inside a character
    assert first_bad_byte(cut) == 3


@pytest.mark.slow
def test_smollm2_tokens_of_a_long_file_are_those_of_the_whole_file(tmp_path):
    """The real tokenizer of the demo model (byte-level BPE with a split pattern) on the language reference,
    with pieces of 997 characters: 400-odd seams, every token equal."""
    from pydoc_data.topics import topics

    path = tmp_path / "pydoc.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    tok = load_tokenizer(resolve("smollm2"))
    assert stitched(tok, path, 997, 64) == whole(tok, path.read_text())


def test_a_tokenizer_without_offsets_gets_the_whole_text(tmp_path, tokenizers):
    """A slow tokenizer has no character offsets to place tokens by: it tokenizes the file whole, as before."""
    fast = tokenizers["byte-level"]

    class Slow:
        is_fast = False

        def __call__(self, text, add_special_tokens=True):
            return fast(text, add_special_tokens=add_special_tokens)

    path = tmp_path / "t.txt"
    path.write_text("key value\n" * 5000)
    assert list(file_tokens(Slow(), TextFile(path), 100, 16)) == [whole(fast, path.read_text())]
