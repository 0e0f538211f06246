"""Tokenizers: equality with the reference implementations on real corpora, save/load round trips, the
cut points that let long documents be encoded in pieces, and the word/char vocabularies."""
import json
import pickle

import numpy as np
import pytest

from corpora import GPT2_PATTERN, gpt2_files as _gpt2_files, gpt2_tiktoken_ranks, gpt2_tokenizer_json, text as _text
from data_tools.metadata import write_metadata
from data_tools.tokenization import (PROBE_TEXT, ByteTokenizer, GPT2Tokenizer, HFTokenizer, SentencePieceTokenizer,
                                     TokenizerError, VocabTokenizer, build_char_vocab,
                                     build_word_vocab, count_words, load_tokenizer, tokenizer_fingerprint,
                                     tokenizer_from_spec, train_byte_bpe)


def _corpora():
    return {"tinyshakespeare": _text("tinyshakespeare/input.txt"),
            "wikitext-2 valid": _text("wikitext-2/valid.txt"),
            "wikitext-2 test": _text("wikitext-2/test.txt")}


@pytest.fixture(scope="module")
def gpt2_files():
    return _gpt2_files()


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return GPT2Tokenizer(*gpt2_files)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, special_tokens={"<|endoftext|>": 50256},
                             mergeable_ranks=load_tiktoken_bpe(gpt2_tiktoken_ranks()))


# ------------------------------------------------------------------------------------------------- gpt2
def test_gpt2_matches_references_on_real_corpora(gpt2, gpt2_files, tiktoken_gpt2):
    """Identical ids to tiktoken's gpt2 ranks (whole files) and to HF ByteLevelBPETokenizer(vocab, merges)
    (tinyshakespeare whole, the start of wikitext-2: it runs at about 1 MB/s); our tokenizers backend
    agrees too; decoding gives the text back."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.ByteLevelBPETokenizer(*gpt2_files)
    ours_ref = GPT2Tokenizer(*gpt2_files, backend="tokenizers")
    counts = {}
    for name, text in _corpora().items():
        ids = gpt2.encode_ids(text)
        assert ids.tolist() == tiktoken_gpt2.encode_ordinary(text), name
        head = text if name == "tinyshakespeare" else text[:150_000]
        assert gpt2.encode(head) == hf.encode(head).ids, name
        assert ours_ref.encode(head[:100_000]) == gpt2.encode(head[:100_000]), name
        assert gpt2.decode(ids) == text, name
        counts[name] = len(ids)
    assert counts["tinyshakespeare"] == 338025 and counts["wikitext-2 valid"] == 258659


def test_gpt2_special_token_text_is_ordinary(gpt2, tiktoken_gpt2):
    text = "a<|endoftext|>b " + PROBE_TEXT
    assert gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert 50256 not in gpt2.encode(text)
    assert (gpt2.vocab_size, gpt2.eod_id) == (50257, 50256)
    assert gpt2.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("legacy_merges", [False, True])
def test_gpt2_from_tokenizer_json_equals_vocab_merges(gpt2, legacy_merges):
    """Both layouts of a tokenizer.json's merges: ["a", "b"] pairs (tokenizers >= 0.20) and "a b" strings."""
    pytest.importorskip("tokenizers")
    tj = GPT2Tokenizer(tokenizer_file=gpt2_tokenizer_json(legacy_merges))
    assert (tj.vocab_size, tj.eod_id) == (gpt2.vocab_size, gpt2.eod_id)
    text = _text("wikitext-2/test.txt")[:200_000] + PROBE_TEXT
    assert np.array_equal(tj.encode_ids(text), gpt2.encode_ids(text))


def test_gpt2_cut_point_is_safe(gpt2):
    """Encoding text[:c] and text[c:] separately equals encoding text, for every cut the tokenizer offers."""
    text = _text("tinyshakespeare/input.txt")[:60_000] + "x\n" + PROBE_TEXT + "\u3000\nfoo \n\nbar"
    whole = gpt2.encode_ids(text).tolist()
    rng = np.random.default_rng(0)
    tried = 0
    for end in rng.integers(1, len(text), 60):
        c = gpt2.cut_point(text[:end])
        if c:
            tried += 1
            assert gpt2.encode(text[:c]) + gpt2.encode(text[c:]) == whole, c
    assert tried > 40
    assert gpt2.cut_point("ab \ncd") == 0 and gpt2.cut_point("ab\n\ncd") == 0 and gpt2.cut_point("ab\ncd") == 3


def test_gpt2_bad_files(tmp_path, gpt2_files):
    with pytest.raises(TokenizerError, match="missing.json: no such vocabulary file"):
        GPT2Tokenizer(str(tmp_path / "missing.json"), gpt2_files[1])
    bad = tmp_path / "merges.txt"
    bad.write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="merges.txt: merge 1"):
        GPT2Tokenizer(gpt2_files[0], str(bad))
    notbpe = tmp_path / "wp.json"
    notbpe.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": None}))
    with pytest.raises(TokenizerError, match="not a GPT-2-style byte-level BPE"):
        GPT2Tokenizer(tokenizer_file=str(notbpe))


# ------------------------------------------------------------------------------------ words and chars
def test_words_reproduce_wikitext_counts():
    valid, test = _text("wikitext-2/valid.txt"), _text("wikitext-2/test.txt")
    counts = {}
    assert count_words(valid, counts) == 217646
    assert counts["<unk>"] == 11718
    tok = build_word_vocab(counts)
    assert tok.symbols[:2] == ["<eos>", "<unk>"] and tok.eod_id == 0 and tok.unk_id == 1
    assert tok.symbols[2] == max(counts, key=counts.get)   # most frequent word first
    assert len(tok.encode(valid)) == 217646 and len(tok.encode(test)) == 245569
    ids = tok.encode(valid)
    assert ids.count(tok.eod_id) == 3760 and tok.unk_id in ids
    assert tok.decode(tok.encode(" = Homarus gammarus = \n\n the zzzz \n")) == "= Homarus gammarus =\n\nthe <unk>\n"


def test_word_vocab_limits():
    counts = {}
    count_words("a a a b b c\nd\n", counts)
    assert build_word_vocab(counts).symbols == ["<eos>", "<unk>", "a", "b", "c", "d"]
    assert build_word_vocab(counts, min_count=2).symbols == ["<eos>", "<unk>", "a", "b"]
    tok = build_word_vocab(counts, max_vocab=3)
    assert tok.symbols == ["<eos>", "<unk>", "a"]
    assert tok.encode("a b zz\n") == [2, 1, 1, 0]
    assert tok.encode("a\n\nb") == [2, 0, 0, 1]  # <eos> per newline: a prompt's last line gets none
    assert tok.decode(tok.encode("a\n\na")) == "a\n\na"
    assert tok.cut_point("a b\nc") == 4


def test_chars_vocab_and_fast_encode():
    text = _text("tinyshakespeare/input.txt")
    tok = build_char_vocab(text)
    assert tok.vocab_size == 65 and tok.symbols == sorted(set(text))
    ids = tok.encode_ids(text)
    assert ids.tolist() == tok.encode(text) and tok.decode(ids) == text
    with pytest.raises(ValueError, match="'é' is not in the vocabulary"):
        tok.encode_ids("café")
    eod = build_char_vocab("ab", eod="<eod>")
    assert eod.symbols == ["a", "b", "<eod>"] and eod.eod_id == 2
    unk = VocabTokenizer(["<unk>", "a"], split="chars", unk="<unk>")
    assert unk.encode_ids("a🙂a").tolist() == [1, 0, 1]


def test_bytes():
    tok = ByteTokenizer(eod=True)
    assert (tok.vocab_size, tok.eod_id) == (257, 256)
    assert tok.encode_ids("é").tolist() == [0xC3, 0xA9] and tok.encode_ids(b"\x00\xff").tolist() == [0, 255]
    assert tok.decode([104, 105, 256]) == "hi"


# ----------------------------------------------------------------------------------- hf, sentencepiece
def test_hf_tokenizer_json_matches_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = gpt2_tokenizer_json()
    tok = HFTokenizer(path)
    ref = tokenizers.Tokenizer.from_file(path)
    text = PROBE_TEXT + _text("wikitext-2/valid.txt")[:100_000]
    assert tok.backend == "gigatoken"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert 50256 in tok.encode("a<|endoftext|>b")  # HF semantics: special tokens in the text are recognised
    assert tok.eod_id == 50256

    # A tokenizer gigatoken cannot run (whitespace pre-tokenizer, no byte fallback): the reference is used.
    from tokenizers import models, pre_tokenizers, trainers
    wp = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(text.split("\n"), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"],
                                                                       show_progress=False))
    wp.save(str(tmp_path / "wp.json"))
    tok = HFTokenizer(str(tmp_path / "wp.json"))
    assert tok.backend == "reference" and tok.fast_unavailable
    assert tok.encode(text) == wp.encode(text, add_special_tokens=False).ids and tok.eod_id == wp.token_to_id("[SEP]")


@pytest.mark.parametrize("model_type, fast", [("bpe", "gigatoken"), ("unigram", "reference")])
def test_sentencepiece_matches_library(tmp_path, model_type, fast):
    spm = pytest.importorskip("sentencepiece")
    text = _text("tinyshakespeare/input.txt")[:100_000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type=model_type, byte_fallback=True, minloglevel=2)
    model = str(tmp_path / "sp.model")
    ref = spm.SentencePieceProcessor(model_file=model)
    tok = SentencePieceTokenizer(model)
    assert tok.backend == fast and tok.vocab_size == 400 and tok.eod_id == ref.eos_id()
    docs = text.split("\n\n")[:500] + [PROBE_TEXT]
    assert [tok.encode(d) for d in docs] == [ref.encode(d) for d in docs]
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"


# ------------------------------------------------------------------------------------- save and load
def test_every_kind_round_trips_through_its_spec(tmp_path, gpt2):
    kinds = [ByteTokenizer(eod=True), build_char_vocab("hello world\n", eod="<eod>"),
             build_word_vocab({"hello": 2, "world": 1}), gpt2,
             HFTokenizer(gpt2_tokenizer_json())]
    text = "hello world\nhello"
    for k, tok in enumerate(kinds):
        prefix = str(tmp_path / f"d{k}")
        spec = tok.save(prefix)
        write_metadata(prefix, {"tokenizer": spec})
        back = load_tokenizer(prefix)
        assert type(back) is type(tok) and back.encode(text) == tok.encode(text)
        assert (back.vocab_size, back.eod_id, back.pad_id) == (tok.vocab_size, tok.eod_id, tok.pad_id)
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
        clone = pickle.loads(pickle.dumps(tok))  # worker processes started by spawn get a pickled copy
        assert clone.encode(text) == tok.encode(text)
        for key in type(tok).file_keys:  # files are named after the prefix, beside it
            if spec.get(key):
                assert spec[key].startswith(f"d{k}.") and (tmp_path / spec[key]).is_file()


def test_fingerprint_ignores_file_names(tmp_path, gpt2):
    a, b = gpt2.save(str(tmp_path / "a")), gpt2.save(str(tmp_path / "b"))
    assert a != b and tokenizer_fingerprint(a, str(tmp_path)) == tokenizer_fingerprint(b, str(tmp_path))
    c = build_char_vocab("abc").save(str(tmp_path / "c"))
    assert tokenizer_fingerprint(c, str(tmp_path)) != tokenizer_fingerprint(a, str(tmp_path))
    with pytest.raises(ValueError, match="unknown tokenizer type 'nope'"):
        tokenizer_from_spec({"type": "nope"}, str(tmp_path))


def test_train_byte_bpe(tmp_path):
    text = _text("tinyshakespeare/input.txt")[:200_000]
    tok = train_byte_bpe(iter(text.split("\n\n")), 400, str(tmp_path / "bpe"))
    assert (tmp_path / "bpe.tokenizer.json").is_file()
    assert tok.vocab_size == 400 and tok.eod_id == 0
    sample = "To be, or not to be: that is the question. Ünïcödé 🙂"
    assert tok.decode(tok.encode(sample)) == sample   # every byte is in the alphabet
    assert len(tok.encode(text[:10_000])) < 0.6 * len(text[:10_000].encode())  # it learned merges
