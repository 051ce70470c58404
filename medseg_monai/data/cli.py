"""``medseg-data`` (or ``python -m medseg_monai.data``): list datasets, generate synthetic ones,
write datalists. Bad input ends with one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from medseg_monai.data.datalist import SPLITS, find_cases, load_datalist, resolve_data_root, write_datalist
from medseg_monai.data.registry import DatasetError, get_dataset, load_registry


def _list(args: argparse.Namespace) -> None:
    for spec in load_registry().values():
        if args.study in (None, spec.study):
            print(
                f"{spec.id:20} {spec.study:6} {spec.kind:9} {', '.join(spec.channels):28} {spec.description[:60]}"
            )


def _generate(args: argparse.Namespace) -> None:
    ids = args.ids or [s.id for s in load_registry().values() if s.synthetic]
    start = time.perf_counter()
    for i, dataset_id in enumerate(ids, 1):
        spec = get_dataset(dataset_id)
        if not spec.synthetic:
            raise DatasetError(f"dataset '{dataset_id}' is real: nothing to generate")
        t = time.perf_counter()
        root = resolve_data_root(dataset_id, args.data_root if len(ids) == 1 else None)
        n = len(find_cases(spec, root))
        print(
            f"[{i}/{len(ids)}] {dataset_id}: {n} cases in {root} ({time.perf_counter() - t:.1f} s)",
            flush=True,
        )
    print(f"done in {time.perf_counter() - start:.1f} s")


def _datalist(args: argparse.Namespace) -> None:
    channels = args.channels.split(",") if args.channels else None
    if args.output:
        out = write_datalist(args.dataset, args.output, args.data_root, args.seed, channels)
        print(out)
        return
    for item in load_datalist(args.dataset, args.data_root, args.split, args.seed, channels):
        print(item["case_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registry's datasets")
    p.add_argument("--study")
    p.set_defaults(func=_list)
    p = sub.add_parser("generate", help="generate synthetic datasets (all when no id is given)")
    p.add_argument("ids", nargs="*")
    p.add_argument("--data_root", help="where to write (one id only; default: the cache)")
    p.set_defaults(func=_generate)
    p = sub.add_parser("datalist", help="print a split's case ids, or write the Decathlon datalist JSON")
    p.add_argument("dataset")
    p.add_argument("--data_root")
    p.add_argument("--split", default="all", choices=SPLITS)
    p.add_argument("--seed", type=int)
    p.add_argument("--channels", help="comma-separated channel names (default: all)")
    p.add_argument("--output", "-o", help="write the Decathlon-style JSON here")
    p.set_defaults(func=_datalist)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
