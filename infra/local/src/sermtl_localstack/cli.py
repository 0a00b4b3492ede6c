"""`python -m sermtl_localstack up|down|status --dir DIR`: the command line of the local stack, which
infra/local/*.sh wrap (see infra/local/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sermtl_localstack.stack import STACK_DEFAULT_PORTS, LocalStack, StackError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sermtl_localstack",
        description="MLflow server + PostgreSQL + SeaweedFS S3 on 127.0.0.1, without Kubernetes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "up", help="start the stack (detached unless --foreground); data persists in --dir"
    )
    down = commands.add_parser("down", help="stop every process of the stack; data stays in --dir")
    status = commands.add_parser("status", help="what runs (exit 0: running, 1: degraded, 3: stopped)")
    for command in (up, down, status):
        command.add_argument("--dir", type=Path, default=Path(".localstack"), help="state, data and logs")
    for name, default in STACK_DEFAULT_PORTS.items():
        flag = {"s3": "--s3-port", "postgres": "--pg-port", "mlflow": "--mlflow-port"}[name]
        up.add_argument(
            flag, type=int, default=None, help=f"default: the last run's, else {default}; 0: any free"
        )
    up.add_argument("--workers", type=int, default=1, help="mlflow server workers")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the stack")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds each service may take to start")
    for command in (up, down):
        command.add_argument("--grace", type=float, default=10.0, help="seconds SeaweedFS gets to stop")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def _up(args: argparse.Namespace) -> int:
    stack = LocalStack(
        args.dir,
        mlflow_port=args.mlflow_port,
        s3_port=args.s3_port,
        pg_port=args.pg_port,
        workers=args.workers,
    )
    try:
        if args.foreground:
            return stack.run_foreground(args.timeout, args.grace)
        already = all(stack.alive(stack.read_state()).values())
        state = stack.up(args.timeout)
    except (StackError, FileNotFoundError, TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(("already running: " if already else "") + stack.describe(state))
    print(f"stop it with: python -m sermtl_localstack down --dir {stack.directory}")
    return 0


def _down(args: argparse.Namespace) -> int:
    stack = LocalStack(args.dir)
    stopped = stack.down(grace_s=args.grace)
    print(f"stopped the stack in {stack.directory}" if stopped else f"no stack running in {stack.directory}")
    return 0


def _status(args: argparse.Namespace) -> int:
    report = LocalStack(args.dir).status()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['state']}: {report['directory']}")
        for name, service in report["services"].items():
            word = "up" if service["healthy"] else "running, not answering" if service["alive"] else "down"
            print(f"  {name:<10} {word:<24} pid {service['pid']}  {service['url']}")
    return {"running": 0, "degraded": 1}.get(report["state"], 3)


def main(argv: list[str] | None = None) -> int:
    """`python -m sermtl_localstack up|down|status --dir DIR`: the local stack (see infra/local/README.md)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return {"up": _up, "down": _down, "status": _status}[args.command](args)
