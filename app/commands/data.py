"""`crescent data ...`: tokenizers and webdataset shards.

  tokenizer  train a byte-level BPE on text sources (or show a tokenizer with --show)
  build      tokenize sources and write shards + manifest.json (--format chat: fine-tuning conversations)
  demo       build the offline demo corpus (tokenizer, `english` and `code` shard sets, the demo chat set)
  inspect    summarize a shard set (or a tokenizer directory); --verify checks every shard's sha256
  schedule   print a stage schedule preset or YAML file, optionally plot it
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

from components.data.demo import DEFAULT_DIR, build_demo
from components.data.remote import is_url
from components.data.shards import build_shards, inspect_shard_set
from components.data.sources import BAD_RECORD_POLICIES, DEFAULT_ENCODINGS, SourceReport, iter_documents
from components.data.tokenizer import load_tokenizer, train_bpe


def _tokenizer(args) -> int:
    if args.show:
        tok = load_tokenizer(args.show)
        print(json.dumps(tok.describe(), indent=2))
        return 0
    if not args.source or not args.out:
        print("crescent data tokenizer: --source and --out are required to train (or use --show DIR)",
              file=sys.stderr)
        return 2
    tok = train_bpe(_documents(args), vocab_size=args.vocab_size, out_dir=args.out)
    print(f"tokenizer: {args.out}  vocab {tok.vocab_size}  eos {tok.eos_id}  fingerprint {tok.fingerprint[:16]}")
    return 0


def _build(args) -> int:
    if args.format == "chat":
        return _build_chat(args)
    tokenizer = args.tokenizer
    if tokenizer is None and is_url(args.out):
        print(f"crescent data build: --out {args.out} is a URL: pass --tokenizer DIR (a local tokenizer; it is "
              "trained into --out only for a local directory)", file=sys.stderr)
        return 2
    out = Path(args.out)
    report = SourceReport()
    try:
        with _removed_if_failed(args.out):
            if tokenizer is None:
                tokenizer = str(out / "tokenizer")
                train_bpe(_documents(args), vocab_size=args.vocab_size, out_dir=tokenizer)
                print(f"trained a byte-level BPE (vocab {args.vocab_size}) into {tokenizer}")
            manifest = build_shards(args.source, args.out, tokenizer, seq_len=args.seq_len,
                                    shard_samples=args.shard_samples, seed=args.seed, workers=args.workers,
                                    text_field=args.text_field, name=args.name, progress=not args.quiet,
                                    num_slices=args.num_slices, slice_index=args.slice_index,
                                    encodings=_encodings(args), on_bad_record=args.on_bad_record, report=report)
    finally:
        for line in report.summary():
            print(f"crescent data build: {line}", file=sys.stderr)
    print(f"{args.out}: {manifest['documents']} documents -> {manifest['samples']} samples of {args.seq_len}+1 "
          f"tokens ({manifest['tokens']} tokens, {manifest['dtype']}) in {len(manifest['shards'])} shards")
    return 0


def _build_chat(args) -> int:
    """Chat records (tulu-3 `messages`) -> packed chat shards with segments and the loss mask."""
    from components.data.chat_build import ChatReport, build_chat_shards

    if args.tokenizer is None:
        print("crescent data build --format chat: pass --tokenizer DIR, a tokenizer with the chat template's special "
              "tokens (the demo tokenizer, or a tiktoken one; the model's own tokenizer)", file=sys.stderr)
        return 2
    report = ChatReport()
    try:
        with _removed_if_failed(args.out):
            manifest = build_chat_shards(args.source, args.out, args.tokenizer, template=args.chat_template,
                                         seq_len=args.seq_len, shard_samples=args.shard_samples, seed=args.seed,
                                         packing=args.packing, too_long=args.too_long,
                                         on_bad_record=args.on_bad_record, name=args.name, report=report)
    finally:
        for line in report.summary():
            print(f"crescent data build: {line}", file=sys.stderr)
    chat = manifest["chat"]
    print(f"{args.out}: {report.records} records -> {chat['conversations']} conversations -> {manifest['samples']} "
          f"samples of {args.seq_len}+1 tokens ({chat['packing']}: {chat['packing_efficiency']:.1%} of the slots "
          f"hold tokens, {chat['target_tokens']} targets) in {len(manifest['shards'])} shards")
    return 0


@contextlib.contextmanager
def _removed_if_failed(location: str):
    """A failed build leaves no (empty or partial) --out behind, when it was the one to create it."""
    out = Path(location)
    created = not is_url(location) and not out.exists()
    try:
        yield
    except BaseException:
        if created and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _encodings(args) -> tuple[str, ...]:
    return tuple(e.strip() for e in args.encoding.split(",") if e.strip())


def _documents(args):
    """The sources' documents under the --encoding / --on-bad-record rules (for training a tokenizer)."""
    return iter_documents(args.source, args.text_field, encodings=_encodings(args), on_bad_record=args.on_bad_record)


def _add_input_rules(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoding", default=",".join(DEFAULT_ENCODINGS),
                   help="encodings to decode text with, tried in order (default: %(default)s); files that needed a "
                        "fallback are counted, files none decodes are skipped")
    p.add_argument("--on-bad-record", choices=BAD_RECORD_POLICIES, default="skip",
                   help="a malformed JSONL line or a record without the text field: skip and count it (default), "
                        "or fail naming file and line")


def _merge(args) -> int:
    from components.data.merge import merge_manifests

    try:
        merged = merge_manifests(args.root, args.parts, wait=args.wait, timeout_s=args.timeout)
    except FileNotFoundError as err:
        print(f"crescent data merge-manifests: {err}", file=sys.stderr)
        return 1
    print(f"{args.root}: {args.parts} parts -> {merged['samples']} samples, {merged['tokens']} tokens in "
          f"{len(merged['shards'])} shards")
    return 0


def _demo(args) -> int:
    from components.data.shards import read_manifest

    paths = build_demo(args.out, vocab_size=args.vocab_size, seq_len=args.seq_len, workers=args.workers,
                       english_chars=args.english_chars, code_chars=args.code_chars, force=args.force,
                       progress=not args.quiet)
    print(f"demo tokenizer: {paths.tokenizer}")
    for name, path in paths.sets.items():
        info = inspect_shard_set(str(path))
        print(f"demo set {name}: {path}  {info['samples']} samples, {info['tokens']} tokens, {info['shards']} shards")
    for split, path in paths.chat.items():
        chat = read_manifest(str(path))["chat"]
        print(f"demo chat set {split}: {path}  {chat['conversations']} conversations, {chat['target_tokens']} "
              f"target tokens, template {chat['template']}")
    print("  (the chat set is synthetic: questions about standard-library functions answered from their own "
          "docstrings, PSF licence; it teaches the turn format and answer style, not instruction following)")
    return 0


def _inspect(args) -> int:
    path = Path(args.path)
    if path.is_dir() and not (path / "manifest.json").exists():
        print(json.dumps(load_tokenizer(path).describe(), indent=2))
        return 0
    info = inspect_shard_set(args.path, verify=args.verify, tokenizer=args.tokenizer, show=args.show)
    preview = info.pop("preview", None)
    print(json.dumps(info, indent=2))
    if preview is not None:
        print("--- first sample of the first shard ---")
        print(preview)
    return 1 if info.get("corrupt_shards") else 0


def _schedule(args) -> int:
    from components.schedule import PRESETS, StageSchedule, get_schedule

    if args.schedule in PRESETS:
        schedule = get_schedule(args.schedule)
    else:
        import yaml

        schedule = StageSchedule.from_dict(yaml.safe_load(Path(args.schedule).read_text()))
    print(f"seq_len {schedule.seq_len}, total {schedule.total_tokens:,} tokens")
    for k, stage in enumerate(schedule.stages):
        print(f"  {k} {stage.name:14s} to {stage.end_tokens:>18,}  {stage.lr_shape:13s} lr {stage.lr_start:g} -> "
              f"{stage.lr_end:g}  batch {stage.batch_size}  mixture {stage.mixture}  bias rate {stage.bias_update_rate:g}")
    for tokens in args.at or []:
        print(f"  at {tokens}: {schedule.at(float(tokens))}")
    if args.plot:
        from app.plots import schedule_figure

        schedule_figure(schedule, path=args.plot)
        print(f"plot: {args.plot}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crescent data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (EOS id 0) or --show one")
    p.add_argument("--source", action="append", help="text file, directory, glob, .jsonl or .parquet (repeatable)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--text-field", default="text")
    p.add_argument("--show", metavar="PATH", help="print a tokenizer's vocab size, eos/bos ids and fingerprint")
    _add_input_rules(p)
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("build", help="tokenize sources into webdataset shards + manifest.json")
    p.add_argument("--source", action="append", required=True, help="text file, directory, glob, .jsonl, .parquet")
    p.add_argument("--out", required=True, help="output directory of the shard set")
    p.add_argument("--tokenizer", help="tokenizer directory or file (default: train one into OUT/tokenizer)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab of the tokenizer trained without --tokenizer")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shard-samples", type=int, default=1024, help="samples per tar shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--name", help="shard set name in the manifest (default: OUT's directory name)")
    p.add_argument("--num-slices", type=int, default=1,
                   help="split the source documents into this many disjoint slices (one per build job)")
    p.add_argument("--slice-index", type=int, default=0, help="which slice this build tokenizes (0-based)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--format", choices=("text", "chat"), default="text",
                   help="text documents (pretraining) or chat records {messages: [{role, content}, ...]} (SFT)")
    p.add_argument("--chat-template", default="moonlight", help="chat template by name (--format chat)")
    p.add_argument("--packing", choices=("best_fit", "none"), default="best_fit",
                   help="pack conversations into samples (best fit) or one per sample with padding (--format chat)")
    p.add_argument("--too-long", choices=("truncate", "drop"), default="truncate",
                   help="a conversation longer than seq_len+1 tokens: truncate it or drop it (counted)")
    _add_input_rules(p)
    p.set_defaults(func=_build)

    p = sub.add_parser("merge-manifests", help="merge ROOT/part-*/manifest.json into one shard set at ROOT")
    p.add_argument("--root", required=True, help="directory holding part-0 ... part-{N-1}")
    p.add_argument("--parts", type=int, required=True, help="how many parts (the build Job's completions)")
    p.add_argument("--wait", action="store_true", help="wait until every part has written its manifest")
    p.add_argument("--timeout", type=float, default=86_400.0, help="seconds to wait with --wait")
    p.set_defaults(func=_merge)

    p = sub.add_parser("demo", help="build the offline demo corpus (english + code) and its tokenizer")
    p.add_argument("--out", default=DEFAULT_DIR)
    p.add_argument("--vocab-size", type=int, default=4096, help="the tiny model preset expects 4096")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--english-chars", type=int, default=1_500_000, help="budget of English characters")
    p.add_argument("--code-chars", type=int, default=2_000_000, help="budget of code characters")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--force", action="store_true", help="rebuild even when already built")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("inspect", help="summarize a shard set (local dir or URL) or a tokenizer directory")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="read every shard and check sha256 and sample counts")
    p.add_argument("--tokenizer", help="decode the first sample with this tokenizer")
    p.add_argument("--show", type=int, default=0, help="print the first N tokens of the first sample")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("schedule", help="print a stage schedule (preset name or YAML file), optionally plot it")
    p.add_argument("schedule", help="preset (moonlight, tiny) or a YAML file with seq_len and stages")
    p.add_argument("--at", action="append", help="also print the state at this many tokens (repeatable)")
    p.add_argument("--plot", help="write a PNG of lr, batch size and mixture over tokens")
    p.set_defaults(func=_schedule)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"crescent data {args.command}: {err}", file=sys.stderr)
        return 2
