"""MLflow pyfunc wrapper of the exported text-to-image folder (models from code).

model = mlflow.pyfunc.load_model("models:/recapflow-text-to-image@champion")
drawn = model.predict(pd.DataFrame({"prompt": ["a red star in the center"]}))
drawn = model.predict(df, params={"expand": 4, "seed": 1})  # needs an expander artifact

Params (the logged signature's): `seed`, `steps` (0: the model's), `guidance_scale`
(negative: the model's), `expand` (0: the prompts as given). `predict` returns a
DataFrame, a row per image: `query` (the prompt asked), `prompt` (what the model was
given), `expanded` and `png` (bytes). It runs models/serving/generate.py's
`text_to_images`, as the `generate` command does.
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
        self.expander = None
        if "expander" in context.artifacts:
            from models.expansion.model import load_expander

            self.expander = load_expander(Path(context.artifacts["expander"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from PIL import Image

        from models.serving.generate import text_to_images

        params = params or {}
        steps, guidance = int(params.get("steps", 0)), float(params.get("guidance_scale", -1))
        images, rows = text_to_images(
            self.pipeline,
            list(model_input["prompt"]),
            expand=int(params.get("expand", 0)),
            expander=self.expander,
            seed=int(params.get("seed", 0)),
            steps=steps if steps > 0 else None,  # 0: the model's own
            guidance_scale=guidance if guidance >= 0 else None,  # < 0: the model's own
        )
        pngs = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pd.DataFrame(
            {
                "query": [r.query for r in rows],
                "prompt": [r.prompt for r in rows],
                "expanded": [r.expanded for r in rows],
                "png": pngs,
            }
        )


mlflow.models.set_model(TextToImage())
