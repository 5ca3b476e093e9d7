"""Range-checked number types for options, and the same checks for plain Python calls.

Annotating a constructor or command argument with one of these types makes jsonargparse
(and so LightningCLI) refuse a bad value while parsing, before any work starts.
Annotations are not enforced on a direct Python call, so constructors also call
:func:`check_ranges`, which raises the same message as a :class:`UserError`.
"""

from __future__ import annotations

import operator
import typing
from collections.abc import Callable, Mapping
from typing import Any

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from lightning_vgg.errors import UserError

#: [0, 1): dropout, label smoothing.
UnitIntervalFromZero = restricted_number_type(
    "UnitIntervalFromZero", float, [(">=", 0.0), ("<", 1.0)]
)
#: (0, 1]: BatchNorm momentum.
UnitIntervalToOne = restricted_number_type("UnitIntervalToOne", float, [(">", 0.0), ("<=", 1.0)])

#: Every range type by name, for turning jsonargparse's messages into one sentence.
RANGE_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        PositiveInt,
        NonNegativeInt,
        PositiveFloat,
        NonNegativeFloat,
        ClosedUnitInterval,
        OpenUnitInterval,
        UnitIntervalFromZero,
        UnitIntervalToOne,
    )
}

__all__ = [
    "RANGE_TYPES",
    "ClosedUnitInterval",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "UnitIntervalFromZero",
    "UnitIntervalToOne",
    "check_ranges",
    "describe_range",
]

_SYMBOL = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<="}


def describe_range(range_type: type) -> str:
    """``'an integer > 0'``, ``'a number in [0, 1)'``, ... for a range type."""
    kind = "an integer" if getattr(range_type, "_type", float) is int else "a number"
    rules = dict(getattr(range_type, "_restrictions", []))
    low = [(op, v) for op, v in rules.items() if op in (operator.gt, operator.ge)]
    high = [(op, v) for op, v in rules.items() if op in (operator.lt, operator.le)]
    if len(low) == 1 and len(high) == 1:
        (lop, lv), (hop, hv) = low[0], high[0]
        left = "(" if lop is operator.gt else "["
        right = ")" if hop is operator.lt else "]"
        return f"{kind} in {left}{lv:g}, {hv:g}{right}"
    parts = [f"{_SYMBOL.get(op, '?')} {v:g}" for op, v in rules.items()]
    return f"{kind} {' and '.join(parts)}" if parts else kind


def _range_type(hint: Any) -> type | None:
    """The range type in ``hint`` (also inside ``Optional``), else None."""
    if isinstance(hint, type) and hint.__name__ in RANGE_TYPES:
        return hint
    for arg in typing.get_args(hint):
        found = _range_type(arg)
        if found is not None:
            return found
    return None


def check_ranges(prefix: str, fn: Callable[..., Any], values: Mapping[str, Any]) -> None:
    """Check ``values`` against the range types in ``fn``'s annotations.

    Args:
        prefix: Names the options in messages (``data`` gives ``data.batch_size``).
        fn: The annotated function, e.g. ``CatsDogsDataModule.__init__``.
        values: Argument values by name; names without a range type are ignored,
            and ``None`` is always accepted (``Optional`` arguments).

    Raises:
        UserError: ``<prefix>.<name> must be <range>, got <value>``.
    """
    hints = typing.get_type_hints(fn)
    for name, value in values.items():
        range_type = _range_type(hints.get(name))
        if range_type is None or value is None:
            continue
        try:
            range_type(value)
        except (TypeError, ValueError):
            option = f"{prefix}.{name}" if prefix else name
            raise UserError(
                f"{option} must be {describe_range(range_type)}, got {value!r}"
            ) from None
