"""MLflow pyfunc wrapper of the exported text-to-image folder (models from code).

model = mlflow.pyfunc.load_model("models:/recapflow-text-to-image@champion")
pngs = model.predict(pd.DataFrame({"prompt": ["a red star in the center"]}))
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import pandas as pd


class TextToImage(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from models.diffusion.text_to_image import load_text_to_image

        self.pipeline = load_text_to_image(Path(context.artifacts["pipeline"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list:
        from PIL import Image

        params = params or {}
        images = self.pipeline(
            list(model_input["prompt"]),
            seed=int(params.get("seed", 0)),
            steps=int(params["steps"]) if "steps" in params else None,
            guidance_scale=float(params["guidance_scale"]) if "guidance_scale" in params else None,
        )
        out = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


mlflow.models.set_model(TextToImage())
