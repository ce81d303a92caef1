"""Where a training run's numbers and pictures go: TensorBoard, Weights & Biases (through accelerate's tracker), or
both (`log_with`). On the other processes of a data-parallel run a `RunLog` is silent: only the main process logs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from sdtune.config import TrainConfig, to_dict

_MEMORY_EVERY = 10  # steps between peak-memory scalars (and the first and last step)
BACKENDS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}


def missing_packages(config: TrainConfig) -> list[str]:
    """Problems with `log_with` on this machine (a backend whose package is not installed)."""
    if "wandb" in BACKENDS[config.log_with] and importlib.util.find_spec("wandb") is None:
        return [f"log_with: {config.log_with} needs the wandb package: pip install 'sdtune[wandb]' (or log_with: "
                "tensorboard)."]  # fmt: skip
    return []


def accelerate_trackers(config: TrainConfig) -> list[str] | None:
    """The `log_with` argument for `accelerate.Accelerator` (TensorBoard is written by sdtune itself)."""
    return ["wandb"] if "wandb" in BACKENDS[config.log_with] else None


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB. Linux: `VmHWM` of /proc/self/status, the peak of this program
    (`ru_maxrss` would include the process it was started from, which Linux carries over an exec); other systems:
    `ru_maxrss` (kilobytes on Linux, bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _peak_memory_scalar() -> tuple[str, float]:
    """(name, MiB) of this process's peak memory: CUDA allocations on a GPU, else the resident set size."""
    if torch.cuda.is_available():
        return "memory/peak_cuda_allocated_mib", torch.cuda.max_memory_allocated() / 2**20
    return "memory/peak_rss_mib", peak_rss_mib()


class RunLog:
    """Scalars, images, the resolved config and the run's hyperparameters, sent to every configured backend.

    TensorBoard events go to `logging_dir` (default `<output_dir>/logs`); a wandb run is started through
    `accelerator.init_trackers` with the config, its files under the same folder (`WANDB_MODE=offline` keeps it
    local).
    """

    def __init__(self, config: TrainConfig, accelerator):
        self.accelerator = accelerator
        self.tensorboard, self.wandb = None, None
        self._epoch_losses: dict[int, list[float]] = {}
        if not accelerator.is_main_process:
            return
        backends = BACKENDS[config.log_with]
        settings = to_dict(config)
        folder = Path(config.logging_dir)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(folder))
            self.tensorboard.add_text("config", "\n".join(f"    {k}: {v}" for k, v in settings.items()))
        if "wandb" in backends:
            folder.mkdir(parents=True, exist_ok=True)
            flat = {
                k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in settings.items()
            }
            init = {"wandb": {"dir": str(folder), "name": config.output_name}}
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
            import wandb  # optional package, present when log_with names it (checked before training)

            self.wandb.log({name: wandb.Image(image)}, step=step)

    def log_step(self, step: int, loss: float, param_groups: list[dict], done: int, elapsed: float, batch: int):
        """Per-step scalars: the loss, the learning rate of each optimizer group, throughput since this run
        (re)started (`done` steps of `batch` samples in `elapsed` seconds, all processes); every tenth step the
        peak memory (this process)."""
        self.add_scalar("loss", loss, step)
        for group in param_groups:
            self.add_scalar(f"lr/{group['name']}", group["lr"], step)
        elapsed = max(elapsed, 1e-9)
        self.add_scalar("speed/steps_per_second", done / elapsed, step)
        self.add_scalar("speed/samples_per_second", done * batch / elapsed, step)
        if step == 1 or step % _MEMORY_EVERY == 0:  # reading the peak costs a file read (CPU) or a call (CUDA)
            self.add_scalar(*_peak_memory_scalar(), step)

    def log_epoch_loss(self, epoch: int, step: int, loss: float) -> None:
        """Adds a step's loss to its epoch; when the epoch changed, logs `loss/epoch_mean` of the finished one."""
        self._flush_epochs(step, keep=epoch)
        self._epoch_losses.setdefault(epoch, []).append(loss)

    def _flush_epochs(self, step: int, keep: int | None = None) -> None:
        for finished in [epoch for epoch in self._epoch_losses if epoch != keep]:
            losses = self._epoch_losses.pop(finished)
            self.add_scalar("loss/epoch_mean", sum(losses) / len(losses), step)

    def finish(self, config: TrainConfig, step: int, final_loss: float) -> None:
        """Logs the last epoch's mean loss and the run's settings with its final loss (TensorBoard's HPARAMS tab,
        to compare runs; the wandb run summary), then closes every backend."""
        self._flush_epochs(step)
        self.add_scalar(*_peak_memory_scalar(), step)
        settings = {k: v for k, v in to_dict(config).items() if isinstance(v, (int, float, str, bool))}
        metrics = {"hparam/final_loss": final_loss, "hparam/steps": step}
        if self.tensorboard is not None:
            self.tensorboard.add_hparams(settings, metrics, run_name=".")
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.summary.update(metrics)
            self.accelerator.end_training()
