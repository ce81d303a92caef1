"""Where a training run's numbers and pictures go: TensorBoard, Weights & Biases (through accelerate's tracker), or
both (`log_with`). Only the main process of a run makes a `RunLog`."""

from __future__ import annotations

import numpy as np

from sdtune.config import TrainConfig, to_dict

BACKENDS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}


def missing_packages(config: TrainConfig) -> list[str]:
    """Problems with `log_with` on this machine (a backend whose package is not installed)."""
    import importlib.util

    if "wandb" in BACKENDS[config.log_with] and importlib.util.find_spec("wandb") is None:
        return [f"log_with: {config.log_with} needs the wandb package: pip install 'sdtune[wandb]' (or log_with: "
                "tensorboard)."]  # fmt: skip
    return []


def accelerate_trackers(config: TrainConfig) -> list[str] | None:
    """The `log_with` argument for `accelerate.Accelerator` (TensorBoard is written by sdtune itself)."""
    return ["wandb"] if "wandb" in BACKENDS[config.log_with] else None


class RunLog:
    """Scalars, images, the resolved config and the run's hyperparameters, sent to every configured backend.

    TensorBoard events go to `logging_dir` (default `<output_dir>/logs`); a wandb run is started through
    `accelerator.init_trackers` with the config, its files under the same folder (`WANDB_MODE=offline` keeps it
    local).
    """

    def __init__(self, config: TrainConfig, accelerator):
        backends = BACKENDS[config.log_with]
        self.accelerator = accelerator
        self.tensorboard, self.wandb = None, None
        settings = to_dict(config)
        folder = config.effective_logging_dir
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(folder))
            self.tensorboard.add_text("config", "\n".join(f"    {k}: {v}" for k, v in settings.items()))
        if "wandb" in backends:
            folder.mkdir(parents=True, exist_ok=True)
            flat = {
                k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in settings.items()
            }
            init = {"wandb": {"dir": str(folder), "name": config.effective_output_name}}
            accelerator.init_trackers(config.log_tracker_name, config=flat, init_kwargs=init)
            self.wandb = accelerator.get_tracker("wandb", unwrap=True)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        """One number at a step (`loss`, `lr/unet`, ...)."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.accelerator.log({name: value}, step=step)

    def add_image(self, name: str, image: np.ndarray, step: int) -> None:
        """An RGB image (height x width x 3, uint8) at a step."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image)}, step=step)

    def add_hparams(self, settings: dict, metrics: dict[str, float]) -> None:
        """The run's settings with its final metrics (TensorBoard's HPARAMS tab; the wandb run summary)."""
        if self.tensorboard is not None:
            self.tensorboard.add_hparams(settings, metrics, run_name=".")
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def close(self) -> None:
        """Flushes and closes every backend."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.accelerator.end_training()
