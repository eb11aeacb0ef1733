"""Command-line flags that also read an environment variable.

Every knob is `--some-flag` on the command line and `FASTSERVE_SOME_FLAG` in the
environment; the flag wins, then the variable, then the default.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any


def env_name(flag: str) -> str:
    return "FASTSERVE_" + flag.lstrip("-").upper().replace("-", "_")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def parse_auto_bool(text: str) -> str:
    """The flag's value as "auto", "true" or "false" (true and false in any spelling `parse_bool` takes)."""
    if text.lower() == "auto":
        return "auto"
    return "true" if parse_bool(text) else "false"


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: Any,
    help: str,
    type: Callable[[str], Any] | None = None,
    choices: list[Any] | None = None,
    env: str | None = None,
    aliases: tuple[str, ...] = (),
    dest: str | None = None,
    const: Any = None,
) -> None:
    """Adds `flag` (and its older `aliases`) with its environment variable (FASTSERVE_<FLAG> unless `env`);
    with `const`, the bare flag means that value."""
    env = env or env_name(flag)
    names = (flag, *aliases)
    named = {"dest": dest} if dest else {}
    if type is None:
        type = parse_bool if isinstance(default, bool) else (builtin_type(default) or str)
    value = default
    if env in os.environ:
        try:
            value = type(os.environ[env])
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"environment variable {env}={os.environ[env]!r} is not valid for {flag}: {exc}")
    if isinstance(default, bool):
        parser.add_argument(
            *names,
            **named,
            default=value,
            type=parse_bool,
            nargs="?",
            const=True,
            metavar="BOOL",
            help=f"{help} [env {env}; default {default}]",
        )
        return
    if const is not None:
        named |= {"nargs": "?", "const": const}
    parser.add_argument(
        *names,
        **named,
        default=value,
        type=type,
        choices=choices,
        help=f"{help} [env {env}; default {default}]",
    )


def builtin_type(value: Any) -> Callable[[str], Any] | None:
    return {int: int, float: float, str: str}.get(value.__class__) if value is not None else None


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--log-level",
        default="INFO",
        help="logging level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    add_flag(
        parser,
        "--internal-token",
        default="",
        help="shared secret of the stack's internal RPCs (fastserve up generates one); "
        "prefer the env var: a flag shows in ps",
    )


def setup_logging(level: str, service: str) -> logging.Logger:
    logging.basicConfig(level=level, format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(f"fastserve.{service}")
