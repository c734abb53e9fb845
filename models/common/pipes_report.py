"""Report a training process's progress to Dagster when Dagster launched it (Pipes),
and to the console otherwise, through one interface.

`dagster_pipes` is Dagster's dependency-free protocol package for external processes,
not Dagster itself, and it is imported only when Dagster launched the process: models/
never imports `dagster`, and a standalone run needs no Dagster package at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

# Dagster's launchers pass the Pipes context in this variable (dagster_pipes'
# DAGSTER_PIPES_CONTEXT_ENV_VAR); standalone runs lack it and never import dagster_pipes.
PIPES_CONTEXT_ENV_VAR = "DAGSTER_PIPES_CONTEXT"

log = logging.getLogger("recapflow")


class Reporter:
    """`info` for progress lines, `extras` for what the launcher passed, `materialized`
    for the final metadata (reported to Dagster; standalone runs print it)."""

    def __init__(self, pipes: Any = None):  # a dagster_pipes.PipesContext under Dagster
        self.pipes = pipes

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.pipes.extras) if self.pipes else {}

    def info(self, message: str) -> None:
        if self.pipes:
            self.pipes.log.info(message)
        log.info(message)
        print(message, flush=True)

    def materialized(self, metadata: dict[str, Any], data_version: str | None = None) -> None:
        if not self.pipes:
            return
        if self.pipes.is_asset_step:
            self.pipes.report_asset_materialization(metadata=metadata, data_version=data_version)
        else:  # launched by an op (the caption ablation): a custom message it reads back
            self.pipes.report_custom_message(metadata)


@contextlib.contextmanager
def open_reporter() -> Iterator[Reporter]:
    if PIPES_CONTEXT_ENV_VAR in os.environ:
        from dagster_pipes import open_dagster_pipes  # the protocol package, not dagster

        with open_dagster_pipes() as pipes:
            yield Reporter(pipes)
    else:
        yield Reporter()
