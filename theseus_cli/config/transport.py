"""The transport recipe (``theseus transport --recipe``): models A, A′, B, the task's data, and the transport
settings; validated like a conversion recipe (every problem at once, with its location)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, field_validator

from theseus_cli.config.errors import format_validation_error
from theseus_cli.config.recipe import MAX_SEED, DataConfig, GuideConfig, StrictModel
from theseus_cli.config.reader import read_yaml
from theseus_cli.errors import RecipeError


class TransportConfig(StrictModel):
    calib_samples: int = Field(64, ge=2, description="unlabelled training inputs the maps are computed from")
    calib_batch_size: int = Field(32, ge=1)
    center: bool = Field(True, description="centre activations before the cross-covariance")
    whiten: float = Field(0.0, ge=0.0, le=0.5, description="partial whitening power p: G_A^-p C G_B^-p")
    alpha: Optional[float] = Field(None, description="fixed α; otherwise chosen on alpha_grid")
    alpha_grid: str = Field("0:2:0.1", description="start:stop:step (inclusive) searched on the validation split")
    val_samples: int = Field(500, ge=1, description="labelled training examples held out to choose α")
    recalibrate_bn: bool = Field(True, description="re-estimate B′'s BatchNorm statistics on the calibration inputs")

    @field_validator("alpha_grid")
    @classmethod
    def _grid(cls, v: str) -> str:
        alpha_values(v)
        return v


class TransportRecipe(StrictModel):
    task: Literal["classification", "causal-lm"] = "classification"
    model_a: GuideConfig = Field(description="architecture of A and A′ (the fine-tuned one)")
    model_b: GuideConfig = Field(description="architecture of B, the other width")
    data: DataConfig = Field(description="the fine-tuning task's data: calibration and validation from its training split")
    transport: TransportConfig = Field(default_factory=TransportConfig)
    seed: int = Field(0, ge=0, le=MAX_SEED)


def alpha_values(spec: str) -> list[float]:
    """``start:stop:step`` → the values, stop included."""
    try:
        start, stop, step = (float(p) for p in spec.split(":"))
    except ValueError:
        raise ValueError(f"alpha grid {spec!r}: expected start:stop:step, e.g. 0:2:0.1") from None
    if step <= 0 or stop < start:
        raise ValueError(f"alpha grid {spec!r}: needs step > 0 and stop ≥ start")
    n = int(round((stop - start) / step))
    return [round(start + i * step, 10) for i in range(n + 1)]


def load_transport_recipe(path: str | Path) -> TransportRecipe:
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections")
    try:
        return TransportRecipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(str(path), exc, TransportRecipe)) from None


