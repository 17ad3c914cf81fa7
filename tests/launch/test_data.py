"""launch/data.py and launch/prepare_data.py: tokenizers, shards, default corpus, packed loader."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import ConfigError
from launch.data import (
    ByteTokenizer,
    PackedLoader,
    TokenShards,
    default_corpus_files,
    list_text_files,
    load_tokenizer,
    prepare_shards,
    read_meta,
    resolve_data,
)
from tests.launch.helpers import REPO


def _random_texts(tmp: Path, n: int) -> list[Path]:
    words = ["alpha", "beta", "gamma", "δέλτα", "epsilon", "zeta\n", "eta", "θ", "def f(x):", "return x"]
    files = []
    for i in range(n):
        f = tmp / f"doc{i:03d}.txt"
        f.write_text(" ".join(random.choice(words) for _ in range(random.randint(5, 400))), encoding="utf-8")
        files.append(f)
    return files


def test_byte_tokenizer_round_trips_utf8() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld → ∑ 𝔘"
    assert tok.decode(tok.encode(text)) == text
    assert np.array_equal(tok.encode_array(text), np.frombuffer(text.encode(), np.uint8))


def test_shards_hold_the_documents_separated_by_eos(tmp_path: Path) -> None:
    files = _random_texts(tmp_path, 7)
    out = prepare_shards(files, tmp_path / "shards", shard_tokens=500, progress=False)
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and len(meta["shards"]) > 1
    expected = []
    for f in files:
        expected += [*f.read_bytes(), ByteTokenizer.eos_id]
    shards = TokenShards(out)
    assert shards.num_tokens == len(expected)
    a, b = sorted(random.sample(range(len(expected)), 2))
    assert shards.slice(a, b).tolist() == expected[a:b]  # across shard boundaries
    assert shards.slice(0, len(expected)).tolist() == expected


def test_truncated_shard_and_bad_paths_are_config_errors(tmp_path: Path) -> None:
    out = prepare_shards(_random_texts(tmp_path, 3), tmp_path / "shards", progress=False)
    shard = out / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="missing or truncated"):
        TokenShards(out)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_data(str(tmp_path / "nope"), str(tmp_path / "cache"), "byte")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no text files"):
        list_text_files([tmp_path / "empty"])


def test_text_folder_is_prepared_once_into_the_cache(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    _random_texts(src, 4)
    first = resolve_data(str(src), str(tmp_path / "cache"), "byte", progress=False)
    mtime = (first / "meta.json").stat().st_mtime_ns
    again = resolve_data(str(src), str(tmp_path / "cache"), "byte", progress=False)
    assert again == first and (again / "meta.json").stat().st_mtime_ns == mtime


def test_default_corpus_is_the_stdlib_and_deterministic() -> None:
    files = default_corpus_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files) and len(files) > 100
    assert not any("site-packages" in f.parts for f in files)
    assert default_corpus_files() == files


@pytest.mark.parametrize("dp", [2, 3, 4])
def test_loader_global_batch_does_not_depend_on_dp(tmp_path: Path, dp: int) -> None:
    out = prepare_shards(_random_texts(tmp_path, 30), tmp_path / "shards", progress=False)
    shards = TokenShards(out)
    seq, batch = 16, 12
    seed = random.randint(0, 1000)
    ref = PackedLoader(shards, seq, batch, 0, 1, seed)
    ranks = [PackedLoader(shards, seq, batch, r, dp, seed) for r in range(dp)]
    for _ in range(ref.num_windows // batch * 2 + 3):  # crosses epochs (a new permutation each)
        whole = ref.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
        assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
        assert torch.equal(whole.tokens[:, 1:], whole.targets[:, :-1])  # targets are the next tokens


def test_loader_position_resumes_exactly(tmp_path: Path) -> None:
    out = prepare_shards(_random_texts(tmp_path, 20), tmp_path / "shards", progress=False)
    shards = TokenShards(out)
    a = PackedLoader(shards, 8, 4, 1, 2, 5)
    for _ in range(random.randint(1, 30)):
        a.next_batch()
    b = PackedLoader(shards, 8, 4, 1, 2, 5)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert torch.equal(a.next_batch().tokens, b.next_batch().tokens)
    c = PackedLoader(shards, 16, 4, 1, 2, 5)
    with pytest.raises(ConfigError, match="seq_len"):
        c.load_state_dict(a.state_dict())


def test_loader_rejects_data_smaller_than_a_batch(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("tiny")
    out = prepare_shards([tmp_path / "t.txt"], tmp_path / "shards", progress=False)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        PackedLoader(TokenShards(out), 8, 4, 0, 1, 0)


def test_bpe_tokenizer_trains_and_round_trips(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    files = _random_texts(tmp_path, 10)
    out = prepare_shards(files, tmp_path / "bpe", tokenizer="bpe", vocab_size=300, progress=False)
    meta = read_meta(out)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 300
    tok = load_tokenizer(out)
    text = files[0].read_text()
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # merges happened


def test_prepare_data_cli(tmp_path: Path) -> None:
    _random_texts(tmp_path, 3)
    res = subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), "--out", str(tmp_path / "o"),
                          "--quiet", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "wrote" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), "--out", str(tmp_path / "o2"),
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
