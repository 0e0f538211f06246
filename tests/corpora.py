"""The corpora shipped in ``corpora/`` (see its README: origin, licence, checksums), decompressed for tests.

``corpus("tinyshakespeare/input.txt")`` returns the path of the decompressed file in a folder private to this
test process (removed at exit), after checking its sha256, so a damaged or half-downloaded fixture fails with
a message instead of odd test results.  Files derived from them (GPT-2's ``tokenizer.json``, its tiktoken
ranks) are built here too.
"""
import atexit
import base64
import hashlib
import json
import lzma
import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPORA = os.path.join(ROOT, "corpora")
SHA256 = {
    "tinyshakespeare/input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "gpt2/vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2/merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "wikitext-2/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext-2/test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CACHE = None


def _cache_dir() -> str:
    global _CACHE
    if _CACHE is None:
        _CACHE = tempfile.mkdtemp(prefix="memtrain-corpora-")
        atexit.register(shutil.rmtree, _CACHE, True)
    return _CACHE


def corpus(name: str) -> str:
    """Path of the decompressed shipped file ``name`` (a key of ``SHA256``), checked against its sha256."""
    out = os.path.join(_cache_dir(), name)
    if not os.path.isfile(out):
        src = os.path.join(CORPORA, name + ".xz")
        with lzma.open(src) as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[name]:
            raise AssertionError(f"{src}: decompresses to sha256 {digest}, expected {SHA256[name]} (a damaged "
                                 f"checkout? see corpora/README.md)")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "wb") as f:
            f.write(data)
        os.replace(out + ".tmp", out)
    return out


def text(name: str) -> str:
    with open(corpus(name), encoding="utf-8") as f:
        return f.read()


def gpt2_files():
    """``(vocab.json, merges.txt)`` of GPT-2."""
    return corpus("gpt2/vocab.json"), corpus("gpt2/merges.txt")


def gpt2_tokenizer_json(legacy_merges: bool = False) -> str:
    """GPT-2 as a Hugging Face ``tokenizer.json``, built by the ``tokenizers`` library from ``vocab.json`` and
    ``merges.txt`` with ``<|endoftext|>`` as its special token (what ``tokenizers`` and ``transformers`` save
    for GPT-2).  ``legacy_merges`` writes the merges as ``"a b"`` strings, the format of files saved before
    ``tokenizers`` 0.20 (pairs ``["a", "b"]`` after)."""
    out = os.path.join(_cache_dir(), "gpt2", "tokenizer.legacy.json" if legacy_merges else "tokenizer.json")
    if not os.path.isfile(out):
        import tokenizers
        tok = tokenizers.ByteLevelBPETokenizer(*gpt2_files())
        tok.add_special_tokens(["<|endoftext|>"])
        spec = json.loads(tok.to_str())
        merges = spec["model"]["merges"]
        if legacy_merges:
            spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
        else:
            spec["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in merges]
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            json.dump(spec, f, ensure_ascii=False)
        os.replace(out + ".tmp", out)
    return out


def _byte_decoder():
    """GPT-2's map from its printable stand-in characters back to bytes (``bytes_to_unicode`` inverted)."""
    from pretrain.hf.export import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


def gpt2_tiktoken_ranks() -> str:
    """GPT-2's tiktoken rank file (base64 of each token's bytes, then its id as rank; no special tokens),
    derived from ``vocab.json``: tiktoken merges by rank alone, an implementation independent of ours."""
    out = os.path.join(_cache_dir(), "gpt2", "gpt2.tiktoken")
    if not os.path.isfile(out):
        decode = _byte_decoder()
        with open(corpus("gpt2/vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        lines = [f"{base64.b64encode(bytes(decode[c] for c in tok)).decode()} {rank}\n"
                 for tok, rank in sorted(vocab.items(), key=lambda kv: kv[1]) if tok != "<|endoftext|>"]
        with open(out + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(out + ".tmp", out)
    return out
