"""Tokenizers as shipped with checkpoints, without transformers at run time.

`load_tokenizer(dir)` reads the tokenizer files a checkpoint ships and returns a `Tokenizer` whose ids equal
what `transformers.AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)` gives (the tests
check this against transformers). Four formats are understood, tried in this order:

1. `tokenizer.json` (HF tokenizers serialization) -> run by the `tokenizers` library as serialized.
2. `vocab.json` + `merges.txt` (Qwen2 / GPT-2 byte-level BPE) -> the pipeline HF's `Qwen2Tokenizer`
   (or `GPT2Tokenizer`) builds from them, rebuilt here with the `tokenizers` library.
3. `tokenizer.model` that sentencepiece can parse (InternLM, Llama-2 style) -> sentencepiece, run the way
   the slow (python) tokenizers that InternVL uses for InternLM run it: the text is split on added/special
   tokens and every remaining piece is encoded by `SentencePieceProcessor.encode`.
4. a tiktoken ranks file (`tokenizer.model` that is not sentencepiece, `tiktoken.model`, `*.tiktoken`) ->
   tiktoken with the pre-tokenization regex transformers' `TikTokenConverter` uses by default (a ranks
   file carries no regex, so that default is the only one AutoTokenizer can apply without remote code).

Added tokens (chat markers such as `<|im_start|>`, InternVL's `<img>`, `<IMG_CONTEXT>`) come from
`tokenizer_config.json` (`added_tokens_decoder`) and `added_tokens.json`, with the ids given there, and are
always recognized as single tokens inside text.

The `Tokenizer` keeps the raw bytes of the files it was built from, so it pickles cheaply into worker
processes (the backend is rebuilt lazily there) and `sha256` identifies it in shard manifests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence
from ..cli_errors import user_path
from ..errors import DataError

# HF Qwen2Tokenizer's pre-tokenization regex (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# transformers' TikTokenConverter default pattern, applied by AutoTokenizer to any tiktoken ranks file.
TIKTOKEN_DEFAULT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Special tokens every InternVL chat tokenizer carries (Qwen2 chat markers + InternVL's image/grounding tags).
CHAT_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

# Files that define a tokenizer; all that exist are hashed into `Tokenizer.sha256`.
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class AddedTokenSpec:
    """One added token as `tokenizer_config.json` describes it."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


# --------------------------------------------------------------------------------------------------
# Reading the config files
# --------------------------------------------------------------------------------------------------


def _token_str(value) -> str | None:
    """tokenizer_config stores special tokens either as plain strings or as AddedToken dicts."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _added_tokens(config: dict, added_tokens_json: dict | None, source: str) -> list[AddedTokenSpec]:
    """Added tokens with their ids, from `added_tokens_decoder` (preferred) and `added_tokens.json`."""
    by_id: dict[int, AddedTokenSpec] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        try:
            tok_id = int(key)
        except ValueError as e:
            raise DataError(f"{source}: added_tokens_decoder key {key!r} is not an integer id") from e
        if isinstance(entry, str):
            entry = {"content": entry}
        if "content" not in entry:
            raise DataError(f"{source}: added_tokens_decoder[{key}] has no 'content'")
        by_id[tok_id] = AddedTokenSpec(
            content=entry["content"],
            id=tok_id,
            special=bool(entry.get("special", True)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", not entry.get("special", True))),
            single_word=bool(entry.get("single_word", False)),
        )
    known = {t.content for t in by_id.values()}
    for content, tok_id in (added_tokens_json or {}).items():
        if content not in known and int(tok_id) not in by_id:
            by_id[int(tok_id)] = AddedTokenSpec(content=content, id=int(tok_id))
    return [by_id[k] for k in sorted(by_id)]


def _read_json_bytes(blob: bytes | None, name: str) -> dict:
    if blob is None:
        return {}
    try:
        return json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{name}: not valid JSON ({e})") from e


# --------------------------------------------------------------------------------------------------
# Splitting text on added tokens (sentencepiece and tiktoken backends; `tokenizers` does it itself)
# --------------------------------------------------------------------------------------------------


class _AddedTokenSplitter:
    """Cuts text into plain chunks and added tokens, leftmost-longest match like HF's added-token trie."""

    def __init__(self, tokens: Sequence[AddedTokenSpec]):
        self.by_content = {t.content: t for t in tokens}
        if not tokens:
            self.regex = None
            return
        # Longest first so that at a given position the longest added token wins.
        alternatives = []
        for t in sorted(tokens, key=lambda t: -len(t.content)):
            alternatives.append(
                (r"\s*" if t.lstrip else "") + "(" + re.escape(t.content) + ")" + (r"\s*" if t.rstrip else "")
            )
        self.regex = re.compile("|".join(f"(?:{a})" for a in alternatives))

    def split(self, text: str) -> list[tuple[bool, str]]:
        """[(is_added_token, text)], plain chunks never empty."""
        if self.regex is None:
            return [(False, text)] if text else []
        out: list[tuple[bool, str]] = []
        pos = 0
        for m in self.regex.finditer(text):
            if m.start() > pos:
                out.append((False, text[pos : m.start()]))
            content = next(g for g in m.groups() if g is not None)
            out.append((True, content))
            pos = m.end()
        if pos < len(text):
            out.append((False, text[pos:]))
        return out


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


class _HFBackend:
    """A `tokenizers.Tokenizer`; it handles added tokens itself."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tok.id_to_token(idx)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _ChunkedBackend:
    """Splits on added tokens, encodes plain chunks with a base encoder (sentencepiece or tiktoken)."""

    def __init__(self, added: Sequence[AddedTokenSpec]):
        self.added = list(added)
        self.splitter = _AddedTokenSplitter(self.added)
        self.added_by_id = {t.id: t.content for t in self.added}

    def _encode_chunk(self, chunk: str) -> list[int]:
        raise NotImplementedError

    def _decode_run(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _base_token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for is_added, chunk in self.splitter.split(text):
            if is_added:
                ids.append(self.splitter.by_content[chunk].id)
            else:
                ids.extend(self._encode_chunk(chunk))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.added_by_id:
                if run:
                    parts.append(self._decode_run(run))
                    run = []
                parts.append(self.added_by_id[i])
            else:
                run.append(i)
        if run:
            parts.append(self._decode_run(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self.splitter.by_content:
            return self.splitter.by_content[token].id
        return self._base_token_to_id(token)


# tokenizer_config classes that transformers (v5) runs as BPE + Metaspace, ignoring the sentencepiece
# normalizer; other classes (InternLM2Tokenizer & co, remote code) run sentencepiece itself per chunk.
_METASPACE_CLASSES = ("LlamaTokenizer", "CodeLlamaTokenizer")


def _raw_sentencepiece_proto(model_bytes: bytes) -> bytes:
    """The same model with normalization, whitespace folding and the dummy prefix switched off."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # protobuf missing
        raise ImportError("reading a Llama-class sentencepiece tokenizer needs the 'protobuf' package") from e
    m = pb.ModelProto()
    m.ParseFromString(model_bytes)
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.precompiled_charsmap = b""
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    return m.SerializeToString()


class _SentencePieceBackend(_ChunkedBackend):
    """sentencepiece, in one of two modes.

    - "slow" (InternLM2/InternLM3 remote-code classes, which InternVL uses with use_fast=False): each chunk
      between added tokens is `sp.encode`d with the model's own normalizer and dummy prefix.
    - "metaspace" (tokenizer_class LlamaTokenizer): what transformers v5 does - no normalizer, spaces become
      U+2581, and a U+2581 is prepended to a chunk by the prepend scheme (`add_prefix_space`, `legacy`) unless
      the chunk already starts with a space.
    """

    def __init__(self, model_bytes: bytes, added: Sequence[AddedTokenSpec], config: dict):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_bytes)
        tok_class = (config.get("tokenizer_class") or "").removesuffix("Fast")
        self.mode = "metaspace" if tok_class in _METASPACE_CLASSES else "slow"
        if self.mode == "metaspace":
            self.raw = spm.SentencePieceProcessor()
            self.raw.LoadFromSerializedProto(_raw_sentencepiece_proto(model_bytes))
            add_prefix_space = config.get("add_prefix_space")
            add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
            legacy = bool(config.get("legacy", False))
            self.prepend = "never" if not add_prefix_space else ("always" if legacy else "first")
        # Control symbols (<s>, </s>) and <unk> are never matched inside text by sentencepiece itself, but
        # transformers treats them as special added tokens; do the same.
        extra = []
        contents = {t.content for t in added}
        ids = {t.id for t in added}
        for i in range(self.sp.GetPieceSize()):
            if (self.sp.IsControl(i) or self.sp.IsUnknown(i)) and i not in ids:
                piece = self.sp.IdToPiece(i)
                if piece not in contents and piece:
                    extra.append(AddedTokenSpec(content=piece, id=i))
        super().__init__(list(added) + extra)

    def encode(self, text: str) -> list[int]:
        if self.mode == "slow":
            return super().encode(text)
        ids: list[int] = []
        offset = 0
        for is_added, chunk in self.splitter.split(text):
            if is_added:
                ids.append(self.splitter.by_content[chunk].id)
            else:
                want = self.prepend == "always" or (self.prepend == "first" and offset == 0)
                if want and not chunk.startswith(" "):
                    chunk = " " + chunk
                ids.extend(self.raw.EncodeAsIds(chunk))
            offset += len(chunk)
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        return list(self.sp.EncodeAsIds(chunk))

    def _decode_run(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)

    def _base_token_to_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return i if self.sp.IdToPiece(i) == token else None

    def id_to_token(self, idx: int) -> str | None:
        if idx in self.added_by_id:
            return self.added_by_id[idx]
        return self.sp.IdToPiece(idx) if 0 <= idx < self.sp.GetPieceSize() else None

    @property
    def vocab_size(self) -> int:
        return max([self.sp.GetPieceSize()] + [t.id + 1 for t in self.added])


def parse_tiktoken_ranks(blob: bytes, name: str = "<ranks>") -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `base64(token_bytes) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(blob.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{name}:{lineno}: expected 'base64 rank', got {line[:60]!r}")
        try:
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, base64.binascii.Error) as e:
            raise DataError(f"{name}:{lineno}: not a tiktoken ranks line ({e})") from e
    if not ranks:
        raise DataError(f"{name}: empty tiktoken ranks file")
    return ranks


class _TiktokenBackend(_ChunkedBackend):
    def __init__(self, ranks_bytes: bytes, added: Sequence[AddedTokenSpec], pattern: str, name: str):
        import tiktoken

        self.ranks = parse_tiktoken_ranks(ranks_bytes, name)
        self.enc = tiktoken.Encoding(
            name="internvl_mcore_" + hashlib.sha1(ranks_bytes).hexdigest()[:12],
            pat_str=pattern,
            mergeable_ranks=self.ranks,
            special_tokens={},
        )
        self.bytes_by_id = {v: k for k, v in self.ranks.items()}
        super().__init__(added)

    def _encode_chunk(self, chunk: str) -> list[int]:
        return self.enc.encode_ordinary(chunk)

    def _decode_run(self, ids: list[int]) -> str:
        return b"".join(self.bytes_by_id[i] for i in ids).decode("utf-8", errors="replace")

    def _base_token_to_id(self, token: str) -> int | None:
        return self.ranks.get(token.encode("utf-8"))

    def id_to_token(self, idx: int) -> str | None:
        if idx in self.added_by_id:
            return self.added_by_id[idx]
        b = self.bytes_by_id.get(idx)
        return None if b is None else b.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return max([max(self.ranks.values()) + 1] + [t.id + 1 for t in self.added])


def _hf_added_token(spec: AddedTokenSpec):
    from tokenizers import AddedToken

    return AddedToken(
        spec.content,
        single_word=spec.single_word,
        lstrip=spec.lstrip,
        rstrip=spec.rstrip,
        normalized=spec.normalized,
        special=spec.special,
    )


def _build_from_tokenizer_json(blob: bytes, added: Sequence[AddedTokenSpec], name: str):
    """tokenizer.json as serialized; added tokens listed only in tokenizer_config are merged in by id."""
    from tokenizers import Tokenizer as HFTokenizer

    data = _read_json_bytes(blob, name)
    present = {t["content"] for t in data.get("added_tokens", [])}
    missing = [spec for spec in added if spec.content not in present]
    if missing:
        vocab = data.get("model", {}).get("vocab")
        if not isinstance(vocab, dict):
            raise DataError(f"{name}: cannot add {missing[0].content!r} to a non-BPE/WordPiece tokenizer.json")
        # The tokenizers library gives an added token its model-vocab id when it has one, else the next
        # free id after the vocab: putting every added token in the vocab pins the ids the config states.
        for spec in added:
            vocab.setdefault(spec.content, spec.id)
        for spec in missing:
            data.setdefault("added_tokens", []).append(
                {
                    "id": spec.id,
                    "content": spec.content,
                    "single_word": spec.single_word,
                    "lstrip": spec.lstrip,
                    "rstrip": spec.rstrip,
                    "normalized": spec.normalized,
                    "special": spec.special,
                }
            )
    tok = HFTokenizer.from_str(json.dumps(data))
    return tok


def _build_from_vocab_merges(
    vocab_blob: bytes, merges_blob: bytes, config: dict, added: Sequence[AddedTokenSpec], name: str
):
    """Rebuild the byte-level BPE pipeline HF's Qwen2Tokenizer / GPT2Tokenizer build from vocab+merges."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab = _read_json_bytes(vocab_blob, name + "/vocab.json")
    merges = []
    for lineno, line in enumerate(merges_blob.decode("utf-8").splitlines(), 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise DataError(f"{name}/merges.txt:{lineno}: expected two space-separated symbols")
        merges.append((parts[0], parts[1]))
    used = {v: k for k, v in vocab.items()}
    for spec in added:
        owner = used.get(spec.id)
        if owner is not None and owner != spec.content:
            raise DataError(
                f"{name}: added token {spec.content!r} wants id {spec.id}, which vocab.json gives to {owner!r}"
            )
        vocab.setdefault(spec.content, spec.id)

    tok_class = (config.get("tokenizer_class") or "Qwen2Tokenizer").removesuffix("Fast")
    add_prefix_space = bool(config.get("add_prefix_space") or False)
    tok = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    if tok_class == "Qwen2Tokenizer":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
    elif tok_class == "GPT2Tokenizer":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    else:
        raise DataError(
            f"{name}: vocab.json+merges.txt with tokenizer_class {tok_class!r} is not supported "
            "(Qwen2Tokenizer and GPT2Tokenizer are); ship a tokenizer.json instead"
        )
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([_hf_added_token(s) for s in added])
    return tok


# --------------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """Thin, picklable wrapper over one of the backends above.

    `encode` never adds BOS/EOS (`add_bos_token` says whether the checkpoint's tokenizer would; the chat
    template uses it the way InternVL's preprocessing does).
    """

    def __init__(self, kind: str, files: dict[str, bytes], directory: str = "", pattern: str | None = None):
        self.kind = kind
        self.directory = directory
        self._files = dict(files)
        self._pattern = pattern
        self.config = _read_json_bytes(files.get("tokenizer_config.json"), f"{directory}/tokenizer_config.json")
        self._backend = None
        self._backend_obj()  # fail early, in the constructing process, on broken files
        self._check_added_ids()

    # -- construction -------------------------------------------------------------------------------
    def _added(self) -> list[AddedTokenSpec]:
        return _added_tokens(
            self.config,
            _read_json_bytes(self._files.get("added_tokens.json"), f"{self.directory}/added_tokens.json"),
            f"{self.directory}/tokenizer_config.json",
        )

    def _backend_obj(self):
        if self._backend is not None:
            return self._backend
        added = self._added()
        d = self.directory
        if self.kind == "tokenizer.json":
            self._backend = _HFBackend(_build_from_tokenizer_json(self._files["tokenizer.json"], added, d))
        elif self.kind == "vocab+merges":
            self._backend = _HFBackend(
                _build_from_vocab_merges(self._files["vocab.json"], self._files["merges.txt"], self.config, added, d)
            )
        elif self.kind == "sentencepiece":
            self._backend = _SentencePieceBackend(self._files[self._model_file()], added, self.config)
        elif self.kind == "tiktoken":
            self._backend = _TiktokenBackend(
                self._files[self._model_file()],
                added,
                self._pattern or TIKTOKEN_DEFAULT_PATTERN,
                os.path.join(d, self._model_file()),
            )
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")
        return self._backend

    def _model_file(self) -> str:
        names = [n for n in self._files if n not in _CONFIG_FILES]
        assert len(names) == 1, names
        return names[0]

    def _check_added_ids(self) -> None:
        """Every added token must get exactly the id the config states (else ids silently shift)."""
        for spec in self._added():
            got = self._backend_obj().token_to_id(spec.content)
            if got != spec.id:
                raise DataError(
                    f"{self.directory}: added token {spec.content!r} should have id {spec.id} "
                    f"(tokenizer_config.json) but the tokenizer gives {got}"
                )

    # -- pickling: ship the file bytes, rebuild the backend lazily ------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_backend"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- API ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS; special tokens written in the text become single tokens."""
        return self._backend_obj().encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens kept."""
        return self._backend_obj().decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int:
        """Id of a single token (e.g. '<IMG_CONTEXT>'); KeyError if the tokenizer has no such token."""
        i = self._backend_obj().token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the tokenizer at {self.directory or '<memory>'}")
        return int(i)

    def id_to_token(self, idx: int) -> str | None:
        return self._backend_obj().id_to_token(int(idx))

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (max id + 1)."""
        return int(self._backend_obj().vocab_size)

    @property
    def sha256(self) -> str:
        """Hash over the names and bytes of every file the tokenizer was built from."""
        h = hashlib.sha256()
        for name in sorted(self._files):
            h.update(name.encode("utf-8") + b"\0")
            h.update(hashlib.sha256(self._files[name]).digest())
        return h.hexdigest()

    def _special_id(self, key: str) -> int | None:
        tok = _token_str(self.config.get(key))
        if tok is None:
            return None
        try:
            return self.token_to_id(tok)
        except KeyError:
            return None

    @property
    def bos_token(self) -> str | None:
        """BOS string from tokenizer_config.json (None for Qwen2-style tokenizers)."""
        return _token_str(self.config.get("bos_token"))

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def add_bos_token(self) -> bool:
        """Whether the checkpoint's tokenizer prepends BOS (InternLM/Llama: yes; Qwen2: no)."""
        default = self.kind == "sentencepiece"  # HF's Llama-style default
        return bool(self.config.get("add_bos_token", default)) and self.bos_token_id is not None

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, dir={self.directory!r}, vocab_size={self.vocab_size})"


def _read(path: str) -> bytes:
    with user_path(DataError), open(path, "rb") as f:  # unreadable (permissions): one line naming the file
        return f.read()


def _is_sentencepiece(blob: bytes) -> bool:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(blob)
    except Exception:  # sentencepiece raises RuntimeError/OSError depending on version
        return False
    return sp.GetPieceSize() > 0


def load_tokenizer(directory: str, tiktoken_pattern: str | None = None) -> Tokenizer:
    """Load the tokenizer a checkpoint directory ships (see the module docstring for the formats).

    `tiktoken_pattern` overrides the pre-tokenization regex for tiktoken ranks files.
    """
    if os.path.isfile(directory):
        raise DataError(f"tokenizer directory {directory!r} is a file; give the folder that holds it")
    if not os.path.isdir(directory):
        raise DataError(f"tokenizer directory {directory!r} does not exist")
    files: dict[str, bytes] = {}
    for name in _CONFIG_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            files[name] = _read(p)

    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(directory, name))

    if has("tokenizer.json"):
        files["tokenizer.json"] = _read(os.path.join(directory, "tokenizer.json"))
        return Tokenizer("tokenizer.json", files, directory)
    if has("vocab.json") and has("merges.txt"):
        files["vocab.json"] = _read(os.path.join(directory, "vocab.json"))
        files["merges.txt"] = _read(os.path.join(directory, "merges.txt"))
        return Tokenizer("vocab+merges", files, directory)
    if has("tokenizer.model"):
        blob = _read(os.path.join(directory, "tokenizer.model"))
        files["tokenizer.model"] = blob
        kind = "sentencepiece" if _is_sentencepiece(blob) else "tiktoken"
        return Tokenizer(kind, files, directory, pattern=tiktoken_pattern)
    ranks = sorted(n for n in os.listdir(directory) if n == "tiktoken.model" or n.endswith(".tiktoken"))
    if ranks:
        files[ranks[0]] = _read(os.path.join(directory, ranks[0]))
        return Tokenizer("tiktoken", files, directory, pattern=tiktoken_pattern)
    raise DataError(
        f"{directory}: no tokenizer found (looked for tokenizer.json, vocab.json+merges.txt, "
        "tokenizer.model, tiktoken.model, *.tiktoken)"
    )
