"""The ``explain`` command: checkpoint + images in, feature-map and Grad-CAM files out."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lightning_vgg.checkpointing import run_dir_of_checkpoint
from lightning_vgg.checks import NonNegativeInt, PositiveInt
from lightning_vgg.data.split import read_split_csv
from lightning_vgg.errors import UserError
from lightning_vgg.explain.atlas import Score, check_score, score_label
from lightning_vgg.explain.drawing import Done, figure_pool, write_image_files
from lightning_vgg.explain.hooks import Tap
from lightning_vgg.explain.inputs import Loaded, collect_images, load_inputs
from lightning_vgg.explain.maps import Normalize, captum_agreement, image_maps, normalize_maps
from lightning_vgg.explain.scales import CamScale
from lightning_vgg.fileio import check_output_dir, output_dir, write_json
from lightning_vgg.labels import CLASS_NAMES
from lightning_vgg.models.loading import load_model_and_preprocess

#: Largest relative difference from Captum accepted by ``explain --check_captum``.
CAPTUM_TOLERANCE = 1e-5


def run_explain(
    ckpt_path: str,
    out: str,
    images: list[str] | None = None,
    n: PositiveInt = 8,
    split_file: str | None = None,
    stage: Tap = "post",
    normalize: Normalize = "per_map",
    device: str = "auto",
    batch_size: PositiveInt = 1,
    max_channels: PositiveInt = 64,
    overview_n: PositiveInt = 8,
    resize: Literal["nearest", "bilinear", "antialias"] | None = None,
    score: Score = "logit",
    workers: NonNegativeInt = 2,
    save_maps: bool = True,
    check_captum: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write feature maps of every layer, Grad-CAM of every layer (cat and dog) and an atlas per image.

    Args:
        ckpt_path: A checkpoint written by ``fit``; it alone rebuilds the network.
        out: Output folder: a new or empty one, or one an earlier ``explain`` wrote
            (its results are replaced). Built beside it and moved in when complete,
            with a manifest (``.lightning_vgg-manifest.json``) of the files written.
            Refused before any work: the current directory, the home directory, and
            any folder that is or holds the checkpoint, its run folder or an image.
        images: Image files or folders. Without them, ``n`` test images (half cats,
            half dogs) come from the run's ``split.csv``.
        n: How many test-split images to take when ``images`` is not given.
        split_file: A ``split.csv``; defaults to the one beside the checkpoint's run.
        stage: Feature maps after the ReLU (``post``, the seed's) or before (``pre``):
            the tap point of :func:`~lightning_vgg.explain.atlas.compute_atlas`.
        normalize: Grad-CAM display scale (:mod:`~lightning_vgg.explain.scales`):
            ``per_map`` (each map to its own maximum: where, not how much),
            ``shared`` (one absolute scale for all layers and both classes, in the
            score's units per pixel) or ``per_layer`` (one scale per layer). Shared
            scales are fitted to each batch of ``batch_size`` images (one image by
            default); every figure states its scale and colour bar, and
            ``explain.json`` records it per image.
        device: ``auto`` (GPU when there is one), ``cpu`` or ``cuda``.
        batch_size: Images per forward/backward pass. The default 1 makes each
            image's numbers independent of the other images given: bit-identical to
            Captum's ``LayerGradCam`` on that image alone. Larger batches are faster
            on a GPU (drawing still dominates) and agree to float rounding, which
            convolution kernels order differently per batch size (up to ~1e-5 of a
            map's peak where its channels cancel).
        max_channels: Channels drawn per layer in the feature-map grids.
        overview_n: Channels per layer in the overview figure.
        resize: How images are brought to the model's input size. ``None`` (the
            default): as the checkpoint's data module evaluated them, the same
            preprocessing (decoder, resize, image size, rescale) that ``test`` and
            ``predict`` use, so ``P(dog)`` here equals ``predictions.csv``. A
            checkpoint without data settings falls back to ``nearest`` and 1/255
            with a warning. An explicit value overrides the checkpoint's resize,
            with a warning when it differs.
        score: What Grad-CAM differentiates: ``logit`` (``+logit`` for the dog
            maps, ``-logit`` for the cat maps; stays informative for confident
            predictions) or ``probability`` (``P(dog)`` and ``1 - P(dog)``, as the
            seed's Keras notebook). Recorded in ``explain.json``, ``maps.npz`` and
            the figure titles.
        workers: Processes drawing figures (matplotlib is the slow part); 0 draws
            in this process.
        save_maps: Also write each image's model input and raw Grad-CAM maps
            (``maps.npz``), so the figures can be checked against other tools.
        check_captum: Recompute every layer's map of both classes with Captum's
            ``LayerGradCam`` (26 extra passes per batch) and record the largest
            relative difference per layer in ``explain.json``; warns above 1e-5.
        overwrite: Also write into a folder holding other files (or another
            command's results). Only the files listed in the folder's manifest (the
            previous results) are replaced or removed; other files are never touched,
            and one standing where a new file goes is refused.

    Returns:
        The output folder.
    """
    paths, labels, inputs = _choose_images(ckpt_path, images, n, split_file)
    check_output_dir(out, inputs, overwrite, "explain", ["explain.json"])
    check_score(score)
    model, pre = load_model_and_preprocess(ckpt_path, device)
    if resize is not None and resize != pre.resize:
        warnings.warn(
            f"--resize={resize} overrides the checkpoint's resize={pre.resize}: the images "
            "are not what test and predict gave this model",
            stacklevel=2,
        )
        pre = pre.with_resize(resize)
    loaded, skipped = load_inputs(paths, pre, labels)
    if not loaded:
        raise UserError(
            f"none of the {len(paths)} image(s) could be read: "
            + "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        )
    settings = _Settings(
        stage, normalize, score, batch_size, max_channels, overview_n, save_maps, check_captum
    )
    with output_dir(out, "explain") as folder, figure_pool(workers) as pool:
        records, agreement = _explain_all(model, loaded, folder, pool, settings)
        summary: dict[str, Any] = {
            "checkpoint": str(Path(ckpt_path).resolve()),
            "device": str(next(model.parameters()).device),
            "stage": stage,
            "normalize": normalize,
            "input_size": pre.image_size,
            "preprocess": pre.describe(),
            "score": score,
            "gradcam_of": {"dog": score_label(score, "dog"), "cat": score_label(score, "cat")},
            "images": records,
            "skipped": [{"image": p, "reason": r} for p, r in skipped],
        }
        if check_captum:
            summary["captum_check"] = _agreement_summary(agreement)
        write_json(folder / "explain.json", summary)
    print(f"wrote {len(records)} image(s) to {out}")
    if check_captum:
        check = summary["captum_check"]
        print(
            f"Captum LayerGradCam agreement: max relative difference {float(check['max_rel_diff']):.2e} "
            f"({check['worst_layer']}), tolerance {CAPTUM_TOLERANCE:g}: "
            + ("passed" if check["passed"] else "FAILED")
        )
    return Path(out)


def _choose_images(
    ckpt_path: str, images: list[str] | None, n: int, split_file: str | None
) -> tuple[list[Path], list[int | None] | None, list[str | Path]]:
    """The images to explain, their labels (``None``: from the paths) and every input
    path the output folder must not be or hold."""
    inputs: list[str | Path] = [ckpt_path, run_dir_of_checkpoint(ckpt_path)]
    labels: list[int | None] | None = None
    if images:
        paths = collect_images(images)
        inputs += images
    else:
        split = Path(split_file) if split_file else run_dir_of_checkpoint(ckpt_path) / "split.csv"
        if not split.is_file():
            raise UserError(
                f"no --images given and no split file at {split}; pass --images PATH or --split_file"
            )
        rows = [r for r in read_split_csv(split) if r[2] == "test"]
        half = max(1, n // 2)
        picked = [r for r in rows if r[1] == 0][:half] + [r for r in rows if r[1] == 1][: n - half]
        paths, labels = [Path(r[0]) for r in picked], [r[1] for r in picked]
        inputs.append(split)
    inputs += sorted({p.parent for p in paths})  # a folder holding an image is refused
    return paths, labels, inputs


@dataclass(frozen=True)
class _Settings:
    """What :func:`run_explain` computes and draws for every batch."""

    tap: Tap
    normalize: Normalize
    score: Score
    batch_size: int
    max_channels: int
    overview_n: int
    save_maps: bool
    check_captum: bool


def _explain_all(
    model: torch.nn.Module,
    loaded: Sequence[Loaded],
    folder: Path,
    pool: Executor | None,
    s: _Settings,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Compute every batch's maps and hand each image's drawing to ``pool``.

    Returns:
        The ``explain.json`` records of the images, in order, and the worst Captum
        difference per layer (empty unless ``check_captum``).
    """
    records: list[dict[str, Any]] = []
    agreement: dict[str, float] = {}
    bar = tqdm(total=len(loaded), desc="explaining", unit="img", disable=len(loaded) < 4)
    used: set[str] = set()
    pending: list[tuple[Any, ...]] = []
    for chunk in batches(loaded, s.batch_size):
        x = torch.stack([c[1] for c in chunk])
        names = [c[0].name for c in chunk]
        maps = image_maps(model, x, names, [c[2] for c in chunk], tap=s.tap, score=s.score)
        scale = normalize_maps(maps, s.normalize)
        if s.check_captum:
            for layer, d in captum_agreement(model, x, maps, s.tap).items():
                agreement[layer] = max(agreement.get(layer, 0.0), d)
        for (path, _, label), m in zip(chunk, maps, strict=True):
            name = _unique(f"{len(records) + len(pending):04d}_{path.stem}", used)
            args = (m, folder / name, scale, s.max_channels, s.overview_n, s.save_maps)
            job = pool.submit(write_image_files, *args) if pool else Done(write_image_files(*args))
            zeros = {cls: c.zero for cls, c in m.classes.items()}
            pending.append((path, label, name, m.prob_dog, zeros, scale, job))
        # Drawing is the slow part; keep at most two batches in flight.
        while len(pending) > 2 * s.batch_size or (pending and pending[0][-1].done()):
            records.append(_record(*pending.pop(0)))
            bar.update(1)
    while pending:
        records.append(_record(*pending.pop(0)))
        bar.update(1)
    bar.close()
    return records, agreement


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _agreement_summary(per_layer: dict[str, float]) -> dict[str, Any]:
    """``explain.json``'s record of the Captum check; warns when it failed."""
    worst = max(per_layer, key=per_layer.__getitem__)
    failed = sorted(k for k, v in per_layer.items() if not v <= CAPTUM_TOLERANCE)
    if failed:
        warnings.warn(
            f"Grad-CAM differs from Captum's LayerGradCam by more than {CAPTUM_TOLERANCE:g} "
            f"(relative) at {', '.join(failed)}",
            stacklevel=3,
        )
    as_json = {k: (v if v < float("inf") else "inf") for k, v in per_layer.items()}  # no JSON inf
    return {
        "reference": "captum.attr.LayerGradCam, one call per layer and class",
        "measure": "max |ours - captum| / max |captum| over the images, worse class",
        "tolerance": CAPTUM_TOLERANCE,
        "max_rel_diff": as_json[worst],
        "worst_layer": worst,
        "passed": not failed,
        "per_layer": as_json,
    }


def _unique(name: str, used: set[str]) -> str:
    safe = re.sub(r"[^\w.\-]+", "_", name)
    while safe in used:
        safe += "_"
    used.add(safe)
    return safe


def _prefix(folder: str, value: Any) -> Any:
    if isinstance(value, dict):
        return {k: f"{folder}/{v}" for k, v in value.items()}
    return f"{folder}/{value}"


def _record(
    path: Path,
    label: int | None,
    folder: str,
    prob_dog: float,
    zeros: dict[str, dict[str, bool]],
    scale: CamScale,
    job: Any,
) -> dict[str, Any]:
    """One image's ``explain.json`` entry, once its files are written."""
    files = job.result()
    return {
        "image": str(path),
        "folder": folder,
        "label": None if label is None else CLASS_NAMES[label],
        "prob_dog": prob_dog,
        "pred": CLASS_NAMES[int(prob_dog >= 0.5)],
        "zero_maps": {cls: sorted(k for k, v in z.items() if v) for cls, z in zeros.items()},
        "scale": scale.as_json(),
        "files": {k: _prefix(folder, v) for k, v in files.items()},
    }
