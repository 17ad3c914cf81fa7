"""Token data: tokenizers, memory-mapped token shards, the default corpus and the packed loader.

Shard folder layout (written by ``prepare_shards``, read by ``TokenShards``)::

    meta.json          {"format": 1, "tokenizer": "byte"|"bpe", "vocab_size": V, "dtype": "uint16"|"uint32",
                        "eos_id": id, "shards": [{"file": "shard_00000.bin", "tokens": N}, ...]}
    shard_00000.bin    raw little-endian token ids, read with numpy.memmap
    tokenizer.json     (bpe only) the trained `tokenizers` model

Documents are concatenated with an end-of-document token between them; the loader cuts the
stream into windows of ``seq_len + 1`` tokens (input = window[:-1], target = window[1:]), so
sequences are packed and no token is padding.

The global batch of step ``s`` is the same whatever the data-parallel size: a deterministic
permutation of the windows (seeded by ``seed`` and the epoch) is consumed ``batch_size`` windows
per step and data-parallel rank ``d`` takes its contiguous slice. The loader's only state is the
number of windows consumed, which the checkpoint stores.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launch.config import ConfigError

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".c", ".h")
DEFAULT_CORPUS_MAX_BYTES = 24 * 2**20  # enough for thousands of tiny-preset steps without repeating


# ---------------------------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255. Byte 0 (never in text files) separates documents."""

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained with the `tokenizers` library; id 0 is the end-of-document token."""

    name = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id("<|eod|>")

    @classmethod
    def train(cls, files: list[Path], vocab_size: int) -> BPETokenizer:
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise ConfigError("data.tokenizer=bpe needs the `tokenizers` package: pip install tokenizers") from None
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eod|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train([str(f) for f in files], trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(shard_dir: str | Path) -> ByteTokenizer | BPETokenizer:
    meta = read_meta(Path(shard_dir))
    if meta["tokenizer"] == "bpe":
        return BPETokenizer.load(Path(shard_dir) / "tokenizer.json")
    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# preparing shards


def list_text_files(paths: Iterable[str | Path]) -> list[Path]:
    """Text files under ``paths`` (files, or folders searched recursively), sorted for determinism."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"data path {str(p)!r} does not exist")
    if not files:
        raise ConfigError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {', '.join(map(str, paths))}")
    return files


def prepare_shards(files: list[Path], out_dir: str | Path, tokenizer: str = "byte", vocab_size: int = 4096,
                   shard_tokens: int = 2**24, max_bytes: int | None = None, progress: bool = True) -> Path:
    """Tokenizes ``files`` (in order, documents separated by eos) into token shards in ``out_dir``.

    Written to a temporary sibling folder and renamed at the end, so a crash never leaves a
    half-written folder that looks complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if max_bytes is not None:
        files = _take_bytes(files, max_bytes)
    tok: ByteTokenizer | BPETokenizer
    if tokenizer == "bpe":
        tok = BPETokenizer.train(files, vocab_size)
        tok.save(tmp / "tokenizer.json")
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        raise ConfigError(f"unknown tokenizer {tokenizer!r}; valid: byte, bpe")
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32

    shards: list[dict] = []
    buf: list[np.ndarray] = []
    buffered = 0

    def flush() -> None:
        nonlocal buf, buffered
        if not buffered:
            return
        name = f"shard_{len(shards):05d}.bin"
        np.concatenate(buf).astype(dtype).tofile(tmp / name)
        shards.append({"file": name, "tokens": int(buffered)})
        buf, buffered = [], 0

    bar = _progress(files, "tokenizing", progress)
    eos = np.asarray([tok.eos_id], dtype=np.int64)
    for f in bar:
        ids = tok.encode_array(f.read_text(encoding="utf-8", errors="replace"))
        if ids.size == 0:
            continue
        buf += [ids.astype(np.int64), eos]
        buffered += ids.size + 1
        if buffered >= shard_tokens:
            flush()
    flush()
    if not shards:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError("the given text files contain no text")
    meta = {"format": FORMAT_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "dtype": np.dtype(dtype).name, "shards": shards, "total_tokens": sum(s["tokens"] for s in shards),
            "sources": len(files)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _take_bytes(files: list[Path], max_bytes: int) -> list[Path]:
    out, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        out.append(f)
        total += f.stat().st_size
    return out


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="file", file=sys.stderr, dynamic_ncols=True)


def default_corpus_files() -> list[Path]:
    """The Python standard library's own .py sources: text every Python installation has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__")
    files = [f for f in sorted(stdlib.rglob("*.py")) if not any(part in skip for part in f.relative_to(stdlib).parts)]
    if not files:
        raise ConfigError(f"no Python sources found under {stdlib} for the default corpus: pass --data.path")
    return files


def default_corpus(cache_dir: str | Path, tokenizer: str = "byte", progress: bool = True) -> Path:
    """Builds (once, under a file lock) and returns the default corpus's shard folder."""
    files = _take_bytes(default_corpus_files(), DEFAULT_CORPUS_MAX_BYTES)
    key = hashlib.sha256("\n".join([sys.version, tokenizer, *(f"{f}:{f.stat().st_size}" for f in files)]).encode())
    return _cached_prepare(files, Path(cache_dir) / f"stdlib-{tokenizer}-{key.hexdigest()[:12]}", tokenizer, progress)


def _cached_prepare(files: list[Path], out: Path, tokenizer: str, progress: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / (out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks on one node build it once; the others wait
        try:
            read_meta(out)
        except ConfigError:
            prepare_shards(files, out, tokenizer=tokenizer, progress=progress)
    return out


def resolve_data(path: str, cache_dir: str, tokenizer: str, progress: bool = True) -> Path:
    """A shard folder for ``data.path``: the default corpus, a prepared folder, or text prepared now."""
    if not path:
        return default_corpus(cache_dir, tokenizer, progress)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data.path {path!r} does not exist")
    if (p / "meta.json").exists():
        read_meta(p)
        return p
    files = list_text_files([p])
    key = hashlib.sha256("\n".join([tokenizer, *(f"{f.resolve()}:{f.stat().st_size}" for f in files)]).encode())
    return _cached_prepare(files, Path(cache_dir) / f"prepared-{tokenizer}-{key.hexdigest()[:12]}", tokenizer, progress)


def read_meta(shard_dir: Path) -> dict:
    """Reads and checks meta.json and the shard sizes; raises ConfigError on anything inconsistent."""
    meta_path = Path(shard_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{shard_dir} is not a token shard folder (no meta.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta_path} is not valid JSON ({e})") from None
    for key in ("format", "tokenizer", "vocab_size", "dtype", "shards"):
        if key not in meta:
            raise ConfigError(f"{meta_path} lacks the key {key!r}")
    if meta["format"] != FORMAT_VERSION or meta["dtype"] not in ("uint16", "uint32"):
        raise ConfigError(f"{meta_path}: unsupported format {meta['format']} / dtype {meta['dtype']}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for s in meta["shards"]:
        f = Path(shard_dir) / s["file"]
        if not f.exists() or f.stat().st_size != s["tokens"] * itemsize:
            raise ConfigError(f"token shard {f} is missing or truncated (expected {s['tokens']} tokens)")
    return meta


class TokenShards:
    """The concatenated token stream of a shard folder, memory-mapped."""

    def __init__(self, shard_dir: str | Path) -> None:
        self.dir = Path(shard_dir)
        self.meta = read_meta(self.dir)
        self.vocab_size = int(self.meta["vocab_size"])
        self._maps = [np.memmap(self.dir / s["file"], dtype=self.meta["dtype"], mode="r") for s in self.meta["shards"]]
        self._starts = np.cumsum([0] + [m.size for m in self._maps])
        self.num_tokens = int(self._starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64."""
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos, filled = start, 0
        while filled < out.size:
            local = pos - self._starts[i]
            take = min(out.size - filled, self._maps[i].size - local)
            out[filled:filled + take] = self._maps[i][local:local + take]
            filled += take
            pos += take
            i += 1
        return out


@dataclass
class Batch:
    tokens: torch.Tensor  # [local_batch, seq_len] int64
    targets: torch.Tensor  # [local_batch, seq_len] int64, tokens shifted by one


class PackedLoader:
    """Packed windows of ``seq_len + 1`` tokens; step batches sharded by data-parallel rank."""

    def __init__(self, shards: TokenShards, seq_len: int, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.num_windows = (shards.num_tokens - 1) // seq_len
        if self.num_windows < global_batch:
            raise ConfigError(f"the data has {shards.num_tokens} tokens: fewer than one global batch of "
                              f"{global_batch} x {seq_len + 1}; use more data or a smaller batch")
        self.consumed = 0  # windows of the global stream consumed so far (the checkpointed position)
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _window_ids(self, start: int, count: int) -> np.ndarray:
        ids = np.empty(count, dtype=np.int64)
        for j in range(count):
            epoch, idx = divmod(start + j, self.num_windows)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
                self._perm_epoch = epoch
            ids[j] = self._perm[idx]
        return ids

    def next_batch(self) -> Batch:
        start = self.consumed + self.dp_rank * self.local_batch
        windows = self._window_ids(start, self.local_batch)
        rows = np.stack([self.shards.slice(w * self.seq_len, w * self.seq_len + self.seq_len + 1) for w in windows])
        self.consumed += self.global_batch
        data = torch.from_numpy(rows)
        return Batch(tokens=data[:, :-1].contiguous(), targets=data[:, 1:].contiguous())

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seq_len": self.seq_len, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seq_len"]) != self.seq_len or int(state["global_batch"]) != self.global_batch:
            raise ConfigError(f"checkpoint data position was for seq_len {state['seq_len']} and batch "
                              f"{state['global_batch']}; this run uses {self.seq_len} and {self.global_batch}")
        self.consumed = int(state["consumed"])
