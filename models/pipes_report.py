"""Report a training process's progress to Dagster when Dagster launched it (Pipes),
and to the console otherwise, through one interface.

`dagster_pipes` is Dagster's dependency-free protocol package for external processes,
not Dagster itself: models/ still never imports `dagster`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from dagster_pipes import (
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    PipesContext,
    open_dagster_pipes,
)

log = logging.getLogger("recapflow")


class Reporter:
    """`info` for progress lines, `extras` for what the launcher passed, `materialized`
    for the final metadata. Standalone runs print and keep the final report."""

    def __init__(self, pipes: PipesContext | None = None):
        self.pipes = pipes
        self.final: dict[str, Any] | None = None

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.pipes.extras) if self.pipes else {}

    def info(self, message: str) -> None:
        if self.pipes:
            self.pipes.log.info(message)
        log.info(message)
        print(message, flush=True)

    def materialized(self, metadata: dict[str, Any], data_version: str | None = None) -> None:
        self.final = metadata
        if self.pipes:
            self.pipes.report_asset_materialization(metadata=metadata, data_version=data_version)


@contextlib.contextmanager
def open_reporter() -> Iterator[Reporter]:
    # Dagster's launchers pass the context through this variable; standalone runs lack it.
    if DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ:
        with open_dagster_pipes() as pipes:
            yield Reporter(pipes)
    else:
        yield Reporter()
