"""`python -m study.run grid.yaml [--dry-run] [--fresh] [--verify-cache] [--address ADDR]`: run a study.

Validates the study file, prints the plan, then runs the stages. A user mistake (a bad key, a
missing file) is printed as one paragraph with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from foundation.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the study file (grid.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan, then exit")
    parser.add_argument("--fresh", action="store_true", help="start the study over instead of resuming it")
    parser.add_argument("--verify-cache", action="store_true",
                        help="re-hash every embedding cache entry (by default an entry verified once is trusted "
                             "while its files keep their size and mtime)")
    parser.add_argument("--address", help="Ray cluster address (overrides ray.address and RAY_ADDRESS)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from study.config import load_config
    from study.plan import build_plan, format_plan

    overrides = {"ray": {"address": args.address}} if args.address else None
    config = load_config(args.config, overrides)
    plan = build_plan(config)
    plan_text = format_plan(plan)
    print(plan_text, flush=True)
    if args.dry_run:
        if plan.missing_weights:
            print(f"Dry run: {len(plan.missing_weights)} checkpoint(s) missing; `python -m study.weights` "
                  f"says where to get them.")
        print("Dry run: nothing was trained.")
        return 0
    from study.runner import format_summary, run_study

    outcome = run_study(config, plan_text, fresh=args.fresh, verify_cache=args.verify_cache)
    print(format_summary(outcome))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted; finished work is kept and the same command resumes.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    # Everything the study wrote is on disk (atomic, fsync'ed writes), Ray is shut down and MLflow's
    # runs are closed; what is left is the interpreter's teardown of torch, Ray and MLflow, 2.4 s
    # on a 2-core machine. Flush and leave without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
