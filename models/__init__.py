"""Torch and Lightning code of recapflow, grouped by stage (see docs/README.md)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
"""Model configs kept in the repo (the `tiny` architectures), shared by every stage."""
