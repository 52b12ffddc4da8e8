"""vae-serve: settings from `VAE_*` environment variables and CLI flags, logging, then serve.

A model that is missing, tampered with or inconsistent, a provider that cannot run, or a port
that is taken ends the process with exit code 1 and a one-line reason, not a traceback;
invalid settings end it with exit code 2 and one line naming each. `--workers N` runs N servers
on the port under this process (`service.workers`).
"""

from __future__ import annotations

import signal

# SIGHUP asks a running server to reload its model; until serve() installs that handler (the
# imports below and the model's loading take a second), its default action would kill the
# process. Ignored meanwhile: the version being loaded is already the newest.
signal.signal(signal.SIGHUP, signal.SIG_IGN)

import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from pydantic import ValidationError  # noqa: E402
from pydantic_settings import CliApp, CliSettingsSource  # noqa: E402

from service import logs, workers  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("vae-serve")

# Short flags the issue names, mapped to the settings' own (kebab-case) flags.
FLAG_ALIASES = {"--model": "--model-name", "--version": "--model-version"}


def _expand_aliases(argv: Sequence[str]) -> list[str]:
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(FLAG_ALIASES.get(flag, flag) + eq + value)
    return out


def parse_settings(argv: Sequence[str]) -> Settings:
    source: CliSettingsSource[Settings] = CliSettingsSource(Settings, cli_prog_name="vae-serve")
    return CliApp.run(Settings, cli_args=_expand_aliases(argv), cli_settings_source=source)


def settings_errors(error: ValidationError) -> str:
    """pydantic's errors on one line: `field: what is wrong` each (a check across fields names
    its fields itself), without pydantic's dump of the input."""

    def one(e: Any) -> str:
        where, what = ".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")
        return f"{where}: {what}" if where else str(what)

    return "; ".join(one(e) for e in error.errors())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except ValidationError as e:
        print(f"vae-serve: invalid settings: {settings_errors(e)}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    log.info("settings: %s", settings.model_dump_json())
    if settings.workers > 1:
        return workers.supervise(settings)
    return workers.run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
