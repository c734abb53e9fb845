"""Print where a `make run` left its results and how to open the UIs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.resources.project import default_project_dir


def main() -> None:
    root = Path(default_project_dir())
    tracking = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    lines = ["", "recapflow: lineage materialized"]
    manifest = root / "data" / "raw" / "manifest.json"
    if manifest.exists():
        counts = json.loads(manifest.read_text(encoding="utf-8"))["counts"]
        lines.append(
            f"  raw alt-text dataset  {manifest.parent}"
            f"  ({counts['kept']} kept, {counts['rejected']} rejected)"
        )
    lines += [
        f"  Dagster UI            make ui      -> http://127.0.0.1:3000  ({root}/.dagster_home)",
        f"  MLflow UI             make mlflow  -> http://127.0.0.1:5000  ({tracking})",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
