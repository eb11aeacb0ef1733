"""The `fastserve` command: one entry point for the stack, each service, and the tools.

Services run as `python -m services.<name>` so this shared package never imports a
service; tools live in fastserve/ and bench/.
"""

from __future__ import annotations

import importlib
import os
import sys

SERVICES = ("gateway", "scheduler", "kvmanager", "worker")
TOOLS = {
    "up": ("fastserve.launcher", "start the whole stack on this machine"),
    "generate": ("fastserve.client", "stream one completion from a gateway"),
    "simulate": ("fastserve.bench.simulator", "discrete-event simulation of the scheduling policies"),
    "bench": ("fastserve.bench.load", "send a workload to a live gateway and report latencies"),
    "protogen": ("fastserve.protogen", "regenerate fastserve/v1 from protos/"),
}

USAGE = "usage: fastserve COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    [f"  {name:<10} {help}" for name, (_, help) in TOOLS.items()]
    + [f"  {name:<10} run the {name} service alone" for name in SERVICES]
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in SERVICES:
        os.execv(sys.executable, [sys.executable, "-m", f"fastserve.services.{command}", *rest])
    if command not in TOOLS:
        print(f"fastserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(TOOLS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
