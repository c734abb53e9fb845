"""MLflow pyfunc wrapper of the exported text-to-image folder (models from code).

model = mlflow.pyfunc.load_model("models:/recapflow-text-to-image@champion")
pngs = model.predict(pd.DataFrame({"prompt": ["a red star in the center"]}))
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import pandas as pd


class TextToImage(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from models.diffusion import DiffusionConfig
        from models.text_encoder import load_text_encoder

        root = Path(context.artifacts["pipeline"])
        cfg = json.loads((root / "train_config.json").read_text())
        self.diffusion = DiffusionConfig(**cfg["diffusion"])
        self.unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(root / "vae").eval()
        self.text = load_text_encoder(root / "text_encoder", cfg["text_encoder"]["context_length"])
        self.eval_cfg = cfg["eval"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list:
        from PIL import Image

        from models.diffusion import generate

        params = params or {}
        images = generate(
            self.unet,
            self.vae,
            self.text,
            list(model_input["prompt"]),
            self.diffusion,
            seed=int(params.get("seed", 0)),
            steps=int(params.get("steps", self.eval_cfg["steps"])),
            guidance_scale=float(params.get("guidance_scale", self.eval_cfg["guidance_scale"])),
        )
        out = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


mlflow.models.set_model(TextToImage())
