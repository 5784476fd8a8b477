"""``ipu-command``: the poprun line that starts an IPU config on its hosts."""

from __future__ import annotations

import shlex
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("ipu-command", help="print the poprun line that starts an IPU config on its hosts")
    p.add_argument("--config", required=True, help="an IPU config (backend: ipu), e.g. bert_base_sparse_pod64")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..ipu.options import plan, poprun_command

    config = load_config(args.config, args.overrides)
    if config.backend != "ipu":
        print(f"error: config {config.name!r} has backend: {config.backend}; IPU configs set backend: ipu "
              "(e.g. bert_base_sparse_pod16)", file=sys.stderr)
        return 1
    p = plan(config)
    ipu = config.ipu
    print(f"# {ipu.instances} instance(s) on {len(ipu.hosts) or 1} host(s), {p.replication_factor} replicas x "
          f"{p.ipus_per_replica} IPUs = {p.total_ipus} IPUs; batch {config.training.batch_size} = micro "
          f"{p.micro_batch_size} x accumulation {p.gradient_accumulation} x {p.replication_factor} replicas; "
          f"{len(p.placement.stages)} pipeline stage(s)")
    cmd = poprun_command(config, args.config)
    if args.overrides:
        cmd += [a for item in args.overrides for a in ("--set", item)]
    print(shlex.join(cmd))
    return 0
