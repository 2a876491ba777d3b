"""What `assay rm serve` and `assay policy serve` share: the config from the command line, its
refusals, and the run.

Each command's options derive from its service's `ServerConfig` (`assay.cli_options`). The config
is built and checked here before the server stack (torch, transformers, fastapi) is imported, so a
wrong option, a missing file or a keyless public bind is refused in a fraction of a second; only
then does the command import its server and run it until SIGINT or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn, TypeVar

from rich.console import Console

from assay.base.connections import BaseServerConfig, check_tls
from assay.base.logs import ACCESS_LOGGER, configure
from assay.cli_options import build

console = Console(stderr=True, soft_wrap=True)  # an error naming a long path stays one line
C = TypeVar("C", bound=BaseServerConfig)


def server_config(cls: type[C], given: Mapping[str, Any], *layers: Mapping[str, Any]) -> C:
    """The config from the command line's `given` values and the command's own `layers`; the keys in
    the service's environment variable come first, then those of --api-key (the command line reads
    the environment, the config does not). A config that does not validate, or a TLS certificate and
    key that do not load, end the command."""
    keys = (*os.environ.get(cls.keys_env_var, "").split(), *given.get("api_keys", ()))
    try:
        config = build(cls, given, *layers, {"api_keys": keys})
        check_tls(config)
    except ValueError as exc:
        refuse(exc)
    return config


def run(serve: Callable[[C], Coroutine[Any, Any, None]], config: C, refused: tuple[type[Exception], ...]) -> None:
    """Serve until interrupted; an exception of `refused` (a model that cannot load, a taken port) ends
    the command with its one-line reason."""
    from assay.base.serve import run_loop

    try:
        run_loop(serve(config))
    except refused as exc:
        refuse(exc)
    except KeyboardInterrupt:
        pass


def setup_logging(config: BaseServerConfig) -> None:
    """The server's log: its level and format (`assay.base.logs`); --no-access-log silences the access lines."""
    configure(config.log_level, config.log_format)
    if not config.access_log:
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)


def refuse(exc: Exception) -> NoReturn:
    """End the command with the reason on one line (exit status 2, as for a bad option)."""
    console.print(f"[red]error:[/red] {exc}")
    sys.exit(2)
