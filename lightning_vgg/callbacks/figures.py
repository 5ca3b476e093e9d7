"""Callbacks that draw: probe feature maps and Grad-CAM during training, the misclassification gallery after test."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_vgg.callbacks.ranks import gather_to_all, local_log_dir, run_dir_of
from lightning_vgg.errors import UserError
from lightning_vgg.explain.atlas import check_score
from lightning_vgg.fileio import save_figure, write_json


class _ProbeCallback(Callback):
    """Shared plumbing of the visualisation callbacks: fixed probes, when and where.

    The probe images (``per_class`` cats and dogs from the validation split) are
    chosen once and kept, so every epoch's figures show the same photos. Work is
    bounded: one forward (and one backward for Grad-CAM) on ``2 * per_class``
    images, plus the figures, every ``every_n_epochs`` epochs and at the end of fit
    and test.
    """

    kind = "probe"

    def __init__(
        self, every_n_epochs: int = 10, per_class: int = 2, log_to_logger: bool = True
    ) -> None:
        if every_n_epochs < 1 or per_class < 1:
            raise UserError(
                f"{type(self).__name__}: every_n_epochs and per_class must be at least 1"
            )
        self.every_n_epochs = every_n_epochs
        self.per_class = per_class
        self.log_to_logger = log_to_logger
        self._probe: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None

    def _probes(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        if self._probe is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "probe_batch"):
                return None
            split = "val" if any(r[2] == "val" for r in (dm.rows or [])) else "test"
            self._probe = dm.probe_batch(self.per_class, split=split)
        return self._probe

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        probes = self._probes(trainer)
        if probes is None:
            return
        # fast_dev_run swaps in a logger without a directory: use the root dir then
        out = Path(local_log_dir(trainer) or trainer.default_root_dir) / "visualizations" / tag
        figures = self.figures(pl_module, *probes)
        logger = trainer.logger
        experiment = getattr(logger, "experiment", None) if self.log_to_logger else None
        for name, fig in figures:
            if experiment is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure(
                    f"{self.kind}/{name}", fig, global_step=trainer.global_step, close=False
                )
            save_figure(fig, out / f"{self.kind}_{name}.png")

    def figures(
        self, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, paths: list[str]
    ) -> list[tuple[str, Any]]:
        """The (name, Figure) pairs to write; computed by explain/."""
        raise NotImplementedError

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "fit_end")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test_end")


class FeatureMapCallback(_ProbeCallback):
    """Feature maps of every conv layer for the fixed probe images (the seed's grids).

    Args:
        every_n_epochs: Draw after every n-th training epoch (and at fit/test end).
        per_class: Probe cats and dogs from the validation split.
        max_channels: Channels per layer grid.
        stage: ``post`` (after ReLU, the seed's) or ``pre`` activation.
        log_to_logger: Also send figures to TensorBoard when it is the logger.
    """

    kind = "features"

    def __init__(
        self,
        every_n_epochs: int = 10,
        per_class: int = 1,
        max_channels: int = 32,
        stage: Literal["post", "pre"] = "post",
        log_to_logger: bool = True,
    ) -> None:
        super().__init__(every_n_epochs, per_class, log_to_logger)
        self.max_channels = max_channels
        self.stage = stage

    def figures(
        self, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, paths: list[str]
    ) -> list[tuple[str, Any]]:
        from lightning_vgg.explain.probes import feature_figures

        return feature_figures(pl_module, x, y, paths, self.stage, self.max_channels)


class GradCAMCallback(_ProbeCallback):
    """Grad-CAM of every conv layer, dog and cat score, for the fixed probe images.

    Args:
        every_n_epochs: Draw after every n-th training epoch (and at fit/test end).
        per_class: Probe cats and dogs from the validation split.
        normalize: ``shared`` (one absolute scale for every layer and probe image,
            in the score's units per pixel: weak evidence looks weak), ``per_layer``
            (one scale per layer, shared by the probe images: deep layers stay
            readable) or ``per_map``. Fitted afresh each time the figures are drawn;
            each figure's title and colour bar state the scale.
        log_to_logger: Also send figures to TensorBoard when it is the logger.
        score: What Grad-CAM differentiates: ``logit`` (``±logit``) or
            ``probability`` (``P(dog)`` / ``1 - P(dog)``, the seed's); see
            :func:`~lightning_vgg.explain.atlas.compute_atlas`. Named in the titles.
    """

    kind = "gradcam"

    def __init__(
        self,
        every_n_epochs: int = 10,
        per_class: int = 2,
        normalize: Literal["shared", "per_layer", "per_map"] = "shared",
        log_to_logger: bool = True,
        score: Literal["logit", "probability"] = "logit",
    ) -> None:
        super().__init__(every_n_epochs, per_class, log_to_logger)
        self.normalize = normalize
        self.score = check_score(score)

    def figures(
        self, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, paths: list[str]
    ) -> list[tuple[str, Any]]:
        from lightning_vgg.explain.probes import gradcam_figures

        return gradcam_figures(pl_module, x, y, paths, self.normalize, self.score)


class MisclassificationGallery(Callback):
    """After ``test``: the k most confident wrong predictions per class, with Grad-CAM.

    Collects every test image's logit, then draws one figure per true class with
    the Grad-CAM of the *predicted* class at ``layer`` (where the model looked to
    make its mistake), and lists them in ``misclassified.json``. Written to the run
    directory of the checkpoint under test. Under DDP every rank tests its share of
    the split; the shares are gathered and rank 0 ranks and draws all of them. The
    images are reloaded through the data module's
    :class:`~lightning_vgg.data.preprocess.Preprocess`, the test loader's own
    preprocessing, so the overlays explain the very inputs that were misclassified.

    Args:
        k: Images per class.
        layer: Conv layer of the overlays (Keras name).
        score: What Grad-CAM differentiates: ``logit`` (``±logit`` of the predicted
            class) or ``probability`` (its probability, as the seed). A figure's
            overlays share one absolute scale in that score's units per input
            pixel (fitted to its maps), drawn as its colour bar.
    """

    def __init__(
        self,
        k: int = 8,
        layer: str = "block5_conv3",
        score: Literal["logit", "probability"] = "logit",
    ) -> None:
        self.k = k
        self.layer = layer
        self.score = check_score(score)
        self._logits: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logits, self._keys = [], []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, dict) and "keys" in outputs:
            self._logits.append(outputs["logits"].float().cpu())
            self._keys.append(outputs["keys"].cpu())

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = (
            (torch.cat(self._logits), torch.cat(self._keys))
            if self._logits
            else (torch.empty(0), torch.empty(0, dtype=torch.long))
        )
        shares = gather_to_all(mine)  # every rank, before any rank may return
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not hasattr(dm, "split_rows"):
            return
        logits = torch.cat([s[0] for s in shares])
        keys = torch.cat([s[1] for s in shares])
        if not len(keys):
            return
        from lightning_vgg.explain.gallery import confident_mistakes, mistakes_figure

        rows = dm.split_rows("test")
        labels = torch.tensor([rows[int(k)][1] for k in keys])
        run_dir = run_dir_of(trainer) or Path(local_log_dir(trainer) or ".")
        listing: dict[str, list[dict[str, Any]]] = {}
        for cls, (cname, found) in enumerate(confident_mistakes(logits, labels, self.k).items()):
            paths = [rows[int(keys[m.index])][0] for m in found]
            listing[cname] = [
                {"image": p, "prob_dog": m.prob_dog, "confidence": m.confidence}
                for p, m in zip(paths, found, strict=True)
            ]
            x = dm.probe_from_paths(paths)[0] if paths else None
            fig = mistakes_figure(pl_module, x, paths, found, cls, self.layer, self.score)
            save_figure(fig, run_dir / f"misclassified_{cname}.png")
        write_json(
            run_dir / "misclassified.json",
            {"layer": self.layer, "k": self.k, "score": self.score, **listing},
        )

    def _score_name(self, pred: int) -> str:
        """The differentiated score of the predicted class ``pred`` (cat 0, dog 1)."""
        from lightning_vgg.explain.gallery import score_name

        return score_name(self.score, pred)
