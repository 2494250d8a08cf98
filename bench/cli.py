"""`python -m bench`: stock diffusers vs imagen, per case; see bench/README.md.

    python -m bench                        # full-size models on the GPU (issue 7's cases)
    python -m bench --tiny                 # tiny models on the CPU (CI)
    python -m bench --cases comic,upscale-256 --switch compile=on --switch upscale_tile=512
    python -m bench --cold                 # also: fresh process until ready, stock vs imagen
    python -m bench --cost [RESULTS.json]  # dollars per 1000 images from a results file
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_CACHE = Path(__file__).parent / ".cache"  # ignored by git (.cache/)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU unless --device says)")
    parser.add_argument("--cases", help="comma-separated case or operation names (default: all)")
    parser.add_argument("--device", default=None, help="auto, cuda or cpu (default: cpu with --tiny, else auto)")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"where the bench models are built and kept (default {DEFAULT_CACHE}/<kind>)")
    parser.add_argument("--results-dir", type=Path, default=None, help="where the JSON goes (default bench/results)")
    parser.add_argument("--switch", action="append", default=[], metavar="NAME=VALUE",
                        help="change one of imagen's switches (image/operations/tuning.py), e.g. "
                        "compile=on, channels_last=off, upscale_tile=512; repeatable")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:SWITCH=VALUE ...",
                        help="also time imagen with these switches changed (space-separated), in "
                        "the same process, against the same stock run, e.g. "
                        "'bf16vae: vae_bf16=on upscale_tile=256,512'; repeatable")
    parser.add_argument("--stock-tuning", action="store_true",
                        help="run imagen with every switch off (checks it equals stock; an upscale larger than "
                             "one tile is still tiled)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: the case's)")
    parser.add_argument("--no-stock", action="store_true", help="time imagen only")
    parser.add_argument("--profile", action="store_true",
                        help="run each path's case once more under torch.profiler; top operators "
                        "go to <results>/profile-<time>/<path>-<case>.txt")
    parser.add_argument("--cold", action="store_true", help="also time a cold start per operation")
    parser.add_argument("--cold-only", action="store_true", help="time cold starts only")
    parser.add_argument("--cold-repeats", type=int, default=1)
    parser.add_argument("--drop-caches", choices=("all", "weights", "none"), default=None,
                        help="before each cold start: drop the whole page cache (root), evict the "
                        "weights only, or neither (default: all for full-size models, else weights)")
    parser.add_argument("--cost", nargs="?", const="newest", default=None, metavar="RESULTS.json",
                        help="print the cost table of a results file (default: the newest) and stop")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_switches(items: list[str], base):
    """`base` (a Tuning) with NAME=VALUE changes (image.operations.tuning.parse_changes)."""
    from image.operations.tuning import parse_changes

    try:
        return parse_changes(base, items)
    except ValueError as error:
        raise SystemExit(f"--switch {error}") from None


def parse_variants(items: list[str], tuning_for) -> list[tuple[str, object]]:
    """`NAME: SWITCH=VALUE SWITCH=VALUE` items as (name, operation -> Tuning) pairs: each
    variant is the switches in force for that operation (`tuning_for`) with its changes."""
    variants = []
    for item in items:
        name, sep, changes = item.partition(":")
        name = name.strip()
        if not sep or not name or not changes.split():
            raise SystemExit(f"--variant {item!r}: expected 'NAME: SWITCH=VALUE ...'")
        if name in {n for n, _ in variants}:
            raise SystemExit(f"--variant {name!r} is given twice")
        parse_switches(changes.split(), tuning_for(None))  # a typo fails before any work
        variants.append((name, lambda op, changes=changes.split(): parse_switches(changes, tuning_for(op))))
    return variants


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("imagen", "diffusers", "transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    from bench import report

    if args.cost is not None:
        from bench.cost import format_cost

        results, path = report.read_results(None if args.cost == "newest" else Path(args.cost),
                                            args.results_dir or report.RESULTS_DIR)
        print(f"{path}\n")
        print(format_cost(results))
        return 0

    from bench.cases import cases_named
    from bench.compare import run_cases
    from bench.configs import FULL, TINY, prepare_models
    from image.device import resolve_device
    from image.models._quiet import quiet_libraries
    from image.operations.tuning import Tuning

    kind = TINY if args.tiny else FULL
    device, dtype = resolve_device(args.device or ("cpu" if args.tiny else "auto"))
    if kind == FULL and device.type != "cuda":
        logging.getLogger("bench").warning(
            "full-size models on the CPU: building and running them takes a long time; "
            "use --tiny, or a GPU")
    cases = cases_named(kind, args.cases.split(",") if args.cases else None)

    def tuning_for(operation):  # imagen's switches for `operation`: its defaults and --switch
        base = Tuning.stock() if args.stock_tuning else Tuning.for_device(device, operation)
        return parse_switches(args.switch, base)

    variants = parse_variants(args.variant, tuning_for)
    cache = args.cache or DEFAULT_CACHE / kind
    operations = list(dict.fromkeys(case.operation for case in cases))

    with quiet_libraries(warnings=args.verbose):
        prepare_models(operations, cache, kind=kind, device=device)
        results = {
            "environment": report.environment(device, dtype, kind),
            "tuning": {op: tuning_for(op).as_dict() for op in operations},
            "switches_on": {op: tuning_for(op).enabled() for op in operations},
            "variants": {name: {op: variant(op).as_dict() for op in operations} for name, variant in variants},
            "cases": [],
            "cold": [],
        }
        results_dir = args.results_dir or report.RESULTS_DIR

        stamp = results["environment"]["created"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
        profile_dir = results_dir / f"profile-{stamp}"

        def save(rows):  # after each path: a run cut short keeps what it measured
            results["cases"] = rows
            report.write_results(results, results_dir)

        if not args.cold_only:
            results["cases"] = run_cases(cases, cache, device, dtype, tuning=tuning_for,
                                         stock=not args.no_stock, repeats=args.repeats,
                                         variants=variants, on_update=save,
                                         profile_dir=profile_dir if args.profile else None)
        if args.cold or args.cold_only:
            from bench.cold import run_cold

            results["cold"] = run_cold(
                operations, cache, device=device.type, dtype=str(dtype).removeprefix("torch."),
                tuning=tuning_for, repeats=args.cold_repeats,
                target_seconds=6.0 if kind == FULL else None,
                drop_caches=args.drop_caches or ("all" if kind == FULL else "weights"),
            )
    path = report.write_results(results, results_dir)
    print(report.format_report(results))
    print(f"\nwritten: {path}")
    failed = [row["case"] for row in results["cases"] if any(
        isinstance(entry, dict) and "error" in entry
        for entry in (row.get("stock"), row.get("imagen"), *(row.get("variants") or {}).values()))]
    failed += [row["operation"] for row in results["cold"] if any(k.endswith("_error") for k in row)]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
