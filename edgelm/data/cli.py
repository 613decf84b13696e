"""`edgelm data train-filter|filter|iterate` (UltraClean)."""

import argparse
import sys


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="UltraClean: train a fastText quality filter, filter shards")
    verbs = data.add_subparsers(dest="data_command", required=True)
    tr = verbs.add_parser("train-filter", help="train the quality classifier (fastText, MiniCPM4 settings)")
    tr.add_argument("--pos", action="append", default=[], help="high-quality JSONL/text file (repeatable)")
    tr.add_argument("--neg", action="append", default=[], help="low-quality JSONL/text file (repeatable)")
    tr.add_argument("--labelled", action="append", default=[], help="JSONL with a 'label' field (repeatable)")
    tr.add_argument("--out", required=True, help="classifier file to write (.bin)")
    tr.add_argument("--epoch", type=int, default=3)
    add_common(tr)
    fl = verbs.add_parser("filter", help="keep documents scoring >= threshold (local, or Ray Data)")
    add_scoring(fl)
    fl.add_argument("--engine", choices=["local", "ray"], default="local")
    fl.add_argument("--batch-size", type=int, default=512)
    fl.add_argument("--report", default=None, help="prefix for the report .json/.png (default: beside --out)")
    it = verbs.add_parser("iterate", help="re-label documents with the current classifier (next round)")
    add_scoring(it)
    it.add_argument("--next-classifier", default=None, help="also train the next round's classifier here")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="the JSONL/Parquet field holding the text")
    p.add_argument(
        "--tokenizer", default=None, help="split words with this model tokenizer (.bin or HF folder)"
    )


def add_scoring(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="JSONL, Parquet or text shards")
    p.add_argument("--classifier", required=True)
    p.add_argument("--out", required=True, help="JSONL to write")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=1, help="worker processes (or Ray actors)")
    add_common(p)


def cmd_data(args) -> None:
    from edgelm.data import ultraclean
    from edgelm.data.report import write_report

    if args.data_command == "train-filter":
        tok = ultraclean.load_tokenizer(args.tokenizer)
        kw = {"tokenizer": tok, "text_field": args.text_field, "epoch": args.epoch}
        print(ultraclean.train_filter(args.out, args.pos, args.neg, args.labelled, **kw))
    elif args.data_command == "filter":
        report = ultraclean.filter_shards(
            args.classifier,
            args.inputs,
            args.out,
            args.threshold,
            engine=args.engine,
            workers=args.workers,
            batch_size=args.batch_size,
            text_field=args.text_field,
            tokenizer_path=args.tokenizer,
        )
        paths = write_report(report, args.report or args.out + ".report")
        print(
            f"kept {report.num_kept}, dropped {report.num_dropped}, {report.docs_per_s:.0f} docs/s; "
            f"report {paths[0]} {paths[1]}",
            file=sys.stderr,
        )
    else:
        pos, neg = ultraclean.iterate(
            args.classifier,
            args.inputs,
            args.out,
            args.threshold,
            next_classifier=args.next_classifier,
            text_field=args.text_field,
            tokenizer_path=args.tokenizer,
            workers=args.workers,
        )
        print(f"labelled {pos} positive, {neg} negative -> {args.out}", file=sys.stderr)
