"""Turns text files into memory-mapped token shards for launch/pretrain.py.

    python launch/prepare_data.py --out data/shards corpus/*.txt
    python launch/prepare_data.py --out data/bpe --tokenizer bpe --vocab-size 8192 corpus/
    python launch/prepare_data.py --out data/stdlib --default      # the default corpus

Exit code 2 with a one-line message for a bad path or empty input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.config import ConfigError
from launch.data import default_corpus_files, list_text_files, prepare_shards, read_meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="text files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="output shard folder")
    parser.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--shard-tokens", type=int, default=2**24, help="tokens per shard file")
    parser.add_argument("--default", action="store_true", help="use the default corpus (Python stdlib sources)")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.default == bool(args.paths):
            raise ConfigError("give text paths or --default (not both, not neither)")
        files = default_corpus_files() if args.default else list_text_files(args.paths)
        out = prepare_shards(files, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                             shard_tokens=args.shard_tokens, max_bytes=args.max_bytes, progress=not args.quiet)
    except ConfigError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    meta = read_meta(out)
    print(f"wrote {meta['total_tokens']} tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}, "
          f"{meta['dtype']}) in {len(meta['shards'])} shard(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
