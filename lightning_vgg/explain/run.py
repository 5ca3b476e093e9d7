"""The explain pipeline: checkpoint + images in, feature-map and Grad-CAM files out."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_vgg.checkpointing import ARCH_KEYS, read_checkpoint
from lightning_vgg.checks import NonNegativeInt, PositiveInt
from lightning_vgg.data.decode import IMAGE_SUFFIXES, ImageDecodeError
from lightning_vgg.data.preprocess import DEFAULT_RESCALE, Preprocess
from lightning_vgg.errors import UserError
from lightning_vgg.explain.atlas import (
    Atlas,
    Score,
    Stage,
    check_score,
    compute_atlas,
    normalize_per_map,
    normalize_shared,
    score_label,
    shared_scale,
    to_density,
)
from lightning_vgg.explain.plots import (
    atlas_figure,
    feature_map_grid,
    feature_overview,
    gradcam_overlay,
    overlay_label,
)
from lightning_vgg.fileio import save_figure
from lightning_vgg.labels import CLASS_NAMES, label_from_path
from lightning_vgg.models.module import VGGClassifier

Normalize = Literal["per_map", "shared"]


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(ckpt_path: str | Path, device: str | torch.device = "auto") -> VGGClassifier:
    """Rebuild the network from a checkpoint's hyperparameters, in eval mode.

    Raises:
        UserError: The file is missing, not a checkpoint of this project, or its
            weights do not fit the architecture its hyperparameters describe.
    """
    return _model_from(read_checkpoint(ckpt_path), ckpt_path, device)


def load_model_and_preprocess(
    ckpt_path: str | Path, device: str | torch.device = "auto"
) -> tuple[VGGClassifier, Preprocess]:
    """The network and the preprocessing it was evaluated with, from one checkpoint read.

    The preprocessing comes from the checkpoint's ``datamodule_hyper_parameters``
    (see :meth:`Preprocess.from_hparams`): what ``test`` and ``predict`` feed the
    network. A checkpoint without them gets the defaults (nearest, 1/255) and a
    warning.

    Raises:
        UserError: As :func:`load_model`.
    """
    ckpt = read_checkpoint(ckpt_path)
    model = _model_from(ckpt, ckpt_path, device)
    hp = ckpt.get("datamodule_hyper_parameters")
    pre = Preprocess.from_hparams(
        hp if isinstance(hp, Mapping) else None,
        image_size=int(model.hparams.input_size),
        source=f"checkpoint {ckpt_path}",
    )
    return model, pre


def _model_from(
    ckpt: dict[str, Any], ckpt_path: str | Path, device: str | torch.device
) -> VGGClassifier:
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or "state_dict" not in ckpt or not all(k in hp for k in ARCH_KEYS):
        raise UserError(f"{ckpt_path} is not a lightning_vgg checkpoint (no VGG hyperparameters)")
    model = VGGClassifier(**{k: v for k, v in hp.items() if not k.startswith("_")})
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise UserError(
            f"checkpoint {ckpt_path} does not match its own architecture: {' '.join(first)}"
        ) from exc
    dev = pick_device(device) if isinstance(device, str) else device
    return model.to(dev).eval()


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a list of image files.

    Folders contribute their images sorted; a file named twice (on its own and inside
    a folder given too) is kept once, where it first appears.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise UserError(
                    f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in folder {p}"
                )
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"image not found: {p}")
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_image(
    path: str | Path, size: int, resize: str = "nearest", rescale: float = DEFAULT_RESCALE
) -> torch.Tensor:
    """One image as a ``(3, S, S)`` float32 model input, exactly as evaluation loads it.

    Shorthand for ``Preprocess(size, resize, rescale).load(path)``; prefer the
    checkpoint's own :class:`Preprocess` (:func:`load_model_and_preprocess`).

    Raises:
        ImageDecodeError: Not an image, corrupt, or too large to decode safely.
    """
    return Preprocess(size, resize, rescale).load(path)  # type: ignore[arg-type]


@dataclass
class ImageMaps:
    """Everything drawn for one image, on the CPU."""

    name: str
    image: torch.Tensor
    prob_dog: float
    label: int | None
    logit: float = float("nan")
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_dog: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_cat: dict[str, torch.Tensor] = field(default_factory=dict)
    dog: dict[str, torch.Tensor] = field(default_factory=dict)
    cat: dict[str, torch.Tensor] = field(default_factory=dict)
    zero_dog: dict[str, bool] = field(default_factory=dict)
    zero_cat: dict[str, bool] = field(default_factory=dict)
    density_dog: dict[str, torch.Tensor] = field(default_factory=dict)
    density_cat: dict[str, torch.Tensor] = field(default_factory=dict)
    score: Score = "logit"


def signed_maps(atlas: Atlas) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dog and cat Grad-CAM from one pass: the cat score is minus the dog logit.

    Grad-CAM is linear in the score before its ReLU, so the cat map is
    ``ReLU(-signed_dog)``: one backward pass serves both classes. With
    ``score="probability"`` the atlas's signed maps are already scaled by each
    image's ``p(1-p) >= 0``, and the same identity gives ``P(dog)``'s and
    ``P(cat) = 1 - P(dog)``'s maps (``d(1-p) = -dp``).
    """
    dog, cat = {}, {}
    for name, signed in atlas.cams_signed.items():
        s = atlas.target_sign.view(-1, 1, 1, 1).to(signed.dtype)
        dog_signed = signed * s
        dog[name] = torch.relu(dog_signed)
        cat[name] = torch.relu(-dog_signed)
    return dog, cat


def image_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    names: Sequence[str],
    labels: Sequence[int | None],
    stage: Stage = "post",
    keep_activations: bool = True,
    score: Score = "logit",
) -> list[ImageMaps]:
    """Feature maps and both classes' Grad-CAM (raw and as densities) for a batch, one pass.

    ``score``: differentiate ``±logit`` or ``P(dog)`` / ``P(cat)`` (see
    :func:`~lightning_vgg.explain.atlas.compute_atlas`).
    """
    atlas = compute_atlas(
        model, images, target="dog", stage=stage, activations=keep_activations, score=score
    )
    dog, cat = signed_maps(atlas)
    size = tuple(images.shape[-2:])
    out = []
    for i, name in enumerate(names):
        im = ImageMaps(
            name=name,
            image=images[i].cpu(),
            prob_dog=float(atlas.probs[i]),
            label=labels[i],
            logit=float(atlas.logits[i]),
            score=score,
        )
        for layer in atlas.layer_names:
            im.raw_dog[layer] = dog[layer][i, 0].cpu()
            im.raw_cat[layer] = cat[layer][i, 0].cpu()
            im.density_dog[layer] = to_density(dog[layer][i : i + 1], size)[0, 0].cpu()
            im.density_cat[layer] = to_density(cat[layer][i : i + 1], size)[0, 0].cpu()
            if keep_activations:
                im.activations[layer] = atlas.activations[layer][i].cpu()
        out.append(im)
    return out


def normalise_maps(
    maps: Sequence[ImageMaps], normalize: Normalize, scale: float | None = None
) -> float | None:
    """Fill the displayable ``dog``/``cat`` maps in [0, 1] and their zero flags.

    ``per_map`` stretches each map to its own maximum (what CAM libraries do);
    ``shared`` divides every map by one scale (a high quantile of all maps given,
    or ``scale``) so weak evidence looks weak across layers and checkpoints.

    Returns:
        The shared scale used, or ``None`` for per-map.
    """
    if normalize == "shared" and scale is None:
        scale = shared_scale(
            [d for m in maps for d in (*m.density_dog.values(), *m.density_cat.values())]
        )
    for m in maps:
        for cls in ("dog", "cat"):
            dens = getattr(m, f"density_{cls}")
            shown, zeros = getattr(m, cls), getattr(m, f"zero_{cls}")
            for layer, d in dens.items():
                per, zero = normalize_per_map(d[None, None])
                zeros[layer] = bool(zero[0])
                shown[layer] = (
                    per[0, 0] if normalize == "per_map" else normalize_shared(d, float(scale))
                )
    return scale if normalize == "shared" else None


def title_of(m: ImageMaps) -> str:
    """File name, prediction, probability, true label and the differentiated score."""
    return f"{m.name}   {overlay_label(m.prob_dog, m.label)}   Grad-CAM of {score_label(m.score)}"


def write_maps(m: ImageMaps, path: Path) -> Path:
    """The numbers behind the figures, for checking them against another implementation.

    One ``.npz`` with the exact model input (``input``, ``(3, S, S)`` float32), the
    ``logit``, the ``score`` mode and, per layer, the raw Grad-CAM of each class at
    the layer's own resolution in the score's units (``gradcam_dog.<layer>``,
    ``gradcam_cat.<layer>``): what Captum's ``LayerGradCam`` returns for the score
    ``+logit`` / ``-logit`` (``score="logit"``) or ``sigmoid(logit)`` /
    ``1 - sigmoid(logit)`` (``score="probability"``) with ``relu_attributions=True``,
    before any upsampling or normalisation.
    """
    from lightning_vgg.fileio import atomic_path

    arrays: dict[str, np.ndarray] = {
        "input": m.image.numpy().astype(np.float32),
        "logit": np.float32(m.logit),
        "score": np.array(m.score),
    }
    for cls in ("dog", "cat"):
        for layer, cam in getattr(m, f"raw_{cls}").items():
            arrays[f"gradcam_{cls}.{layer}"] = cam.numpy().astype(np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def captum_agreement(
    model: torch.nn.Module, images: torch.Tensor, maps: Sequence[ImageMaps], stage: Stage
) -> dict[str, float]:
    """Per layer, the largest relative difference between our maps and Captum's.

    Runs Captum's ``LayerGradCam`` once per layer and class (26 forward and backward
    passes for a batch) on the same input and score (the maps' ``score``), and
    compares it with the one-pass maps in
    ``maps``: ``max |ours - captum| / max |captum|`` over the batch, the worse of the
    two classes. A layer where Captum's map is all zero scores 0 if ours is all zero
    too, else infinity.
    """
    from lightning_vgg.explain.atlas import captum_gradcam

    worst: dict[str, float] = {}
    with torch.enable_grad():
        for layer in maps[0].raw_dog:
            diffs = []
            for cls, sign in (("dog", 1.0), ("cat", -1.0)):
                ref = captum_gradcam(model, images, layer, sign, stage=stage, score=maps[0].score)
                ref = ref[:, 0].cpu().double()
                ours = torch.stack([getattr(m, f"raw_{cls}")[layer] for m in maps]).double()
                peak = float(ref.abs().max())
                err = float((ours - ref).abs().max())
                diffs.append(err / peak if peak > 0 else (0.0 if err == 0 else float("inf")))
            worst[layer] = max(diffs)
    return worst


def write_image_files(
    m: ImageMaps, out: Path, max_channels: int = 64, overview_n: int = 8, save_maps: bool = True
) -> dict[str, Any]:
    """All files of one image: feature grids, overview, overlays, the atlas and the raw maps."""
    files: dict[str, Any] = {"features": {}, "gradcam_dog": {}, "gradcam_cat": {}}
    title = title_of(m)
    if save_maps:
        p = write_maps(m, out / "maps.npz")
        files["maps"] = p.relative_to(out).as_posix()
    for layer, act in m.activations.items():
        p = save_figure(
            feature_map_grid(act, layer, max_channels=max_channels),
            out / "features" / f"{layer}.png",
        )
        files["features"][layer] = p.relative_to(out).as_posix()
    if m.activations:
        p = save_figure(
            feature_overview(m.activations, n=overview_n), out / "features_overview.png"
        )
        files["features_overview"] = p.relative_to(out).as_posix()
    for cls in ("dog", "cat"):
        shown, zeros = getattr(m, cls), getattr(m, f"zero_{cls}")
        for layer, map01 in shown.items():
            fig = gradcam_overlay(
                m.image,
                map01,
                f"{layer}, Grad-CAM of {score_label(m.score, cls)} — {title}",
                zero=zeros[layer],
            )
            p = save_figure(fig, out / "gradcam" / f"{layer}_{cls}.png")
            files[f"gradcam_{cls}"][layer] = p.relative_to(out).as_posix()
    p = save_figure(
        atlas_figure(m.image, m.dog, m.cat, m.zero_dog, m.zero_cat, title=title), out / "atlas.png"
    )
    files["atlas"] = p.relative_to(out).as_posix()
    return files


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def load_inputs(
    paths: Sequence[Path], pre: Preprocess, labels: Sequence[int | None] | None = None
) -> tuple[list[tuple[Path, torch.Tensor, int | None]], list[tuple[str, str]]]:
    """Model inputs (:meth:`Preprocess.load`) of the readable images, and the reasons
    for the others."""
    ok, skipped = [], []
    for i, p in enumerate(paths):
        try:
            x = pre.load(p)
        except (ImageDecodeError, OSError) as exc:
            skipped.append((str(p), getattr(exc, "reason", str(exc))))
            continue
        ok.append((p, x, labels[i] if labels is not None else label_from_path(p)))
    if skipped:
        listed = "; ".join(f"{p} ({r})" for p, r in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {listed}{more}", stacklevel=2)
    return ok, skipped


def run_explain(
    ckpt_path: str,
    out: str,
    images: list[str] | None = None,
    n: PositiveInt = 8,
    split_file: str | None = None,
    stage: Stage = "post",
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
        stage: Feature maps after the ReLU (``post``, the seed's) or before (``pre``).
        normalize: Grad-CAM display scale: ``per_map`` or ``shared`` across layers.
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
    from lightning_vgg.checkpointing import run_dir_of_checkpoint
    from lightning_vgg.data.split import read_split_csv
    from lightning_vgg.fileio import check_output_dir, output_dir, write_json

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
    size = pre.image_size
    loaded, skipped = load_inputs(paths, pre, labels)
    if not loaded:
        raise UserError(
            f"none of the {len(paths)} image(s) could be read: "
            + "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        )

    records: list[dict[str, Any]] = []
    agreement: dict[str, float] = {}
    with output_dir(out, "explain") as stage_dir, _figure_pool(workers) as pool:
        bar = tqdm(total=len(loaded), desc="explaining", unit="img", disable=len(loaded) < 4)
        used: set[str] = set()
        pending = []
        for chunk in batches(loaded, batch_size):
            x = torch.stack([c[1] for c in chunk])
            names = [c[0].name for c in chunk]
            maps = image_maps(model, x, names, [c[2] for c in chunk], stage=stage, score=score)
            normalise_maps(maps, normalize)
            if check_captum:
                for layer, d in captum_agreement(model, x, maps, stage).items():
                    agreement[layer] = max(agreement.get(layer, 0.0), d)
            for (path, _, label), m in zip(chunk, maps, strict=True):
                folder = _unique(f"{len(records) + len(pending):04d}_{path.stem}", used)
                args = (m, stage_dir / folder, max_channels, overview_n, save_maps)
                job = (
                    pool.submit(write_image_files, *args)
                    if pool
                    else _Done(write_image_files(*args))
                )
                pending.append((path, label, folder, m.prob_dog, m.zero_dog, m.zero_cat, job))
            # Drawing is the slow part; keep at most two batches in flight.
            while len(pending) > 2 * batch_size or (pending and pending[0][-1].done()):
                records.append(_record(*pending.pop(0)))
                bar.update(1)
        while pending:
            records.append(_record(*pending.pop(0)))
            bar.update(1)
        bar.close()
        summary: dict[str, Any] = {
            "checkpoint": str(Path(ckpt_path).resolve()),
            "device": str(next(model.parameters()).device),
            "stage": stage,
            "normalize": normalize,
            "input_size": size,
            "preprocess": pre.describe(),
            "score": score,
            "gradcam_of": {"dog": score_label(score, "dog"), "cat": score_label(score, "cat")},
            "images": records,
            "skipped": [{"image": p, "reason": r} for p, r in skipped],
        }
        if check_captum:
            summary["captum_check"] = _agreement_summary(agreement)
        write_json(stage_dir / "explain.json", summary)
    print(f"wrote {len(records)} image(s) to {out}")
    if check_captum:
        check = summary["captum_check"]
        print(
            f"Captum LayerGradCam agreement: max relative difference {float(check['max_rel_diff']):.2e} "
            f"({check['worst_layer']}), tolerance {CAPTUM_TOLERANCE:g}: "
            + ("passed" if check["passed"] else "FAILED")
        )
    return Path(out)


#: Largest relative difference from Captum accepted by ``explain --check_captum``.
CAPTUM_TOLERANCE = 1e-5


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


class _Done:
    """A finished job, so serial and pooled drawing share one code path."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value


@contextlib.contextmanager
def _figure_pool(workers: int) -> Iterator[Any]:
    """A process pool for drawing, or ``None`` for serial drawing.

    Not plain ``fork``: the pool starts its processes at the first job, after the
    model has run, and a child forked from a process whose torch thread pool is
    running deadlocks in its first parallel op (seen here as a hung ``explain``).
    ``forkserver`` forks from a clean server process instead, and ``spawn`` is the
    fallback where there is none; each worker pays its imports once.
    """
    if workers <= 0:
        yield None
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context(method), initializer=_drawing_worker
    ) as pool:
        yield pool


def _drawing_worker() -> None:
    """One thread per drawing process: they run side by side, not inside each other."""
    torch.set_num_threads(1)


def _record(
    path: Path,
    label: int | None,
    folder: str,
    prob_dog: float,
    zero_dog: dict[str, bool],
    zero_cat: dict[str, bool],
    job: Any,
) -> dict[str, Any]:
    files = job.result()
    return {
        "image": str(path),
        "folder": folder,
        "label": None if label is None else CLASS_NAMES[label],
        "prob_dog": prob_dog,
        "pred": CLASS_NAMES[int(prob_dog >= 0.5)],
        "zero_maps": {
            "dog": sorted(k for k, v in zero_dog.items() if v),
            "cat": sorted(k for k, v in zero_cat.items() if v),
        },
        "files": {k: _prefix(folder, v) for k, v in files.items()},
    }
