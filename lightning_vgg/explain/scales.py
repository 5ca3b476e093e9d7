"""How a Grad-CAM figure's colours map to evidence: the three display scales, and what figures say about them.

A heat map means nothing without its scale. Three are offered, and every Grad-CAM
figure names the one it uses in its title and draws a colour bar with its unit:

* ``per_map``: each map divided by its own maximum. Shows *where* a map looks, never
  *how much*: a model with almost no evidence looks as hot as one with plenty.
* ``absolute``: one scale for every map in the figure (all layers; in the report
  both models), in the score's units per input pixel
  (:func:`~lightning_vgg.explain.normalize.to_density`). Weak evidence looks weak;
  deep layers, whose evidence is spread thin, can look uniformly dark.
* ``per_layer``: one scale per layer, shared by every image and model drawn: deep
  layers stay readable, and within a column the models stay comparable; columns are
  not comparable with each other.

Each scale is the 99th percentile of the non-zero values it covers
(:func:`~lightning_vgg.explain.normalize.shared_scale`), so one hot pixel does not
wash everything else out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from lightning_vgg.explain.normalize import normalize_per_map, normalize_shared, shared_scale

__all__ = ["CamScale", "ScaleKind", "density_unit"]

ScaleKind = Literal["per_map", "absolute", "per_layer"]


def density_unit(score: str) -> str:
    """The unit of a Grad-CAM density for a differentiated ``score`` (``logit`` or ``probability``)."""
    return "probability" if score == "probability" else "logit"


@dataclass(frozen=True)
class CamScale:
    """One figure's Grad-CAM display scale.

    Attributes:
        kind: ``per_map``, ``absolute`` or ``per_layer`` (see the module docstring).
        unit: The density's unit, ``logit`` or ``probability`` (per input pixel).
        value: ``absolute``: the density drawn in the top colour.
        layers: ``per_layer``: ``layer -> its density drawn in the top colour``.
        across: What the scale is shared by, for titles (``all layers, both models and
            classes`` ...).
    """

    kind: ScaleKind
    unit: str = "logit"
    value: float = 1.0
    layers: Mapping[str, float] = field(default_factory=dict)
    across: str = ""

    @classmethod
    def fit(
        cls,
        kind: ScaleKind,
        densities: Iterable[tuple[str, Tensor]],
        unit: str = "logit",
        across: str = "",
    ) -> CamScale:
        """The scale of ``kind`` for ``(layer, density map)`` pairs that are drawn together."""
        pairs = list(densities)
        if kind == "per_map":
            return cls("per_map", unit, across=across)
        if kind == "absolute":
            return cls("absolute", unit, shared_scale([d for _, d in pairs]), across=across)
        if kind != "per_layer":
            raise ValueError(f"unknown scale {kind!r}: use per_map, absolute or per_layer")
        by_layer: dict[str, list[Tensor]] = {}
        for layer, d in pairs:
            by_layer.setdefault(layer, []).append(d)
        return cls(
            "per_layer",
            unit,
            layers={k: shared_scale(v) for k, v in by_layer.items()},
            across=across,
        )

    def top(self, layer: str) -> float:
        """The density drawn in the top colour at ``layer`` (``nan`` for ``per_map``)."""
        if self.kind == "absolute":
            return self.value
        if self.kind == "per_layer":
            if layer not in self.layers:
                raise KeyError(f"the per-layer scale has no value for {layer!r}")
            return self.layers[layer]
        return float("nan")

    def normalize(self, layer: str, density: Tensor) -> Tensor:
        """``density`` (``(H, W)``) of ``layer`` as drawn: in ``[0, 1]`` on this scale."""
        if self.kind == "per_map":
            return normalize_per_map(density[None, None])[0][0, 0]
        return normalize_shared(density, self.top(layer))

    def title(self, layer: str | None = None) -> str:
        """A line for a figure's title saying which scale its colours use.

        ``layer``: the figure shows that one layer (a per-layer scale then reads as
        an absolute one, with that layer's top value).
        """
        across = f", shared by {self.across}" if self.across else ""
        if self.kind == "per_map":
            return "colour: each map ÷ its own maximum (where, not how much)"
        if self.kind == "absolute":
            return f"colour: one absolute scale{across}; top = {self.value:.3g} {self.unit}/pixel"
        if layer is not None:
            return (
                f"colour: {layer}'s own scale{across}; "
                f"top = {self.top(layer):.3g} {self.unit}/pixel"
            )
        return (
            f"colour: one scale per layer{across} (top value under each column); "
            "compare within a column"
        )

    def colorbar_label(self, layer: str | None = None) -> str:
        """The colour bar's label, with the unit (physical where one top value applies)."""
        if self.kind == "per_map":
            return "fraction of the map's own maximum"
        if self.kind == "absolute" or layer is not None:
            return f"Grad-CAM, {self.unit} per input pixel"
        return "fraction of the layer's scale"

    def colorbar_max(self, layer: str | None = None) -> float:
        """The colour bar's top value: physical where one top value applies, else 1."""
        if self.kind == "absolute":
            return self.value
        if self.kind == "per_layer" and layer is not None:
            return self.top(layer)
        return 1.0

    def column_note(self, layer: str) -> str:
        """Under a layer's column on the per-layer scale: what its top colour is."""
        return f"top {self.top(layer):.2g}" if self.kind == "per_layer" else ""

    def as_json(self) -> dict[str, object]:
        """For ``explain.json`` / ``measures.json``: the numbers behind the colours."""
        out: dict[str, object] = {"kind": self.kind, "unit": f"{self.unit} per input pixel"}
        if self.kind == "absolute":
            out["top"] = self.value
        if self.kind == "per_layer":
            out["top"] = dict(self.layers)
        out["quantile"] = None if self.kind == "per_map" else 0.99
        return out
