"""`python -m moetuner.study job|finish ...`: the Snakemake rules' helpers (see moetuner.study)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from moetuner.study.jobs import parse_wildcards, run_job
from moetuner.study.parent_run import finish_parent


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m moetuner.study job|finish ...` (the Snakemake rules' helpers)."""
    parser = argparse.ArgumentParser(prog="python -m moetuner.study")
    sub = parser.add_subparsers(dest="cmd", required=True)
    job = sub.add_parser("job", help="run an app command as a child of the study's parent run")
    job.add_argument("--results", required=True)
    job.add_argument("--rule", required=True)
    job.add_argument("--wildcards", default="", help="k=v,k=v")
    job.add_argument("command", nargs=argparse.REMAINDER, help="-- app arguments...")
    fin = sub.add_parser("finish", help="log the report on the parent run and end it")
    fin.add_argument("--results", required=True)
    fin.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED"])
    fin.add_argument("--metrics", help="a JSON file of scalar metrics to log on the parent")
    fin.add_argument("--note", help="a Markdown file shown as the parent run's description")
    fin.add_argument("artifacts", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.cmd == "job":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        assert command, "give the app command after --"
        return run_job(args.results, args.rule, parse_wildcards(args.wildcards), command)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    note = Path(args.note).read_text() if args.note else None
    finish_parent(args.results, args.status, args.artifacts, metrics, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
