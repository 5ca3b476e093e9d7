"""Option parse errors as user errors: jsonargparse's dumps shortened to one line."""

from __future__ import annotations

import re

from lightning_vgg.checks import RANGE_TYPES, describe_range
from lightning_vgg.errors import UserError


class OptionsError(UserError):
    """A command's options did not parse: one line, plus where the options are listed.

    Args:
        message: jsonargparse's message (shortened with :func:`one_line`).
        command: The command whose options were wrong (``""`` when none was named).
        flag_prefix: Put before the key in the message (see :func:`one_line`).
    """

    def __init__(self, message: str, command: str, flag_prefix: str = "") -> None:
        super().__init__(one_line(message, flag_prefix))
        self.command = command

    @property
    def see_also(self) -> str:
        """The line after ``error:`` that names the help to read."""
        return f"(see: lightning-vgg {self.command} --help)".replace("  ", " ")


# jsonargparse's union/subclass dumps: lines that explain the structure, not the problem
_NOISE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:"
    r"|Given value type: .*|Given value: .*|Expected a <class 'NoneType'>"
    r"|Not a valid subclass of .*|Subclass types expect one of:|a (class path|dict) .*)"
)


def one_line(message: str, flag_prefix: str = "") -> str:
    """jsonargparse's (often multi-line) parse error as its most specific sentence.

    ``Parser key "K":`` plus a dump of every union member's failure becomes
    ``K: <the deepest message>`` (with the class_path it concerns); a value outside
    a range type becomes ``K must be <range>, got <value>``. ``flag_prefix`` goes
    before ``K`` (``--`` for the function commands, whose keys are bare names).
    """
    lines = [ln.rstrip() for ln in str(message).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return " ".join(lines)
    head = re.fullmatch(r'Parser key "(.+)":', lines[0].strip())
    key = flag_prefix + head.group(1) if head else None
    body = lines[1:] if head else lines
    given = None
    for ln in body:
        if ln.strip().startswith("Given value: "):
            given = ln.strip()[len("Given value: ") :]
    for ln in body:
        m = re.search(r"Not of type (\w+): (.*)", ln)
        if m and m.group(1) in RANGE_TYPES:
            bad = re.match(r"(.*?) ?does not conform|invalid literal .*: (.+)$", m.group(2))
            value = given if given is not None else (bad and (bad.group(1) or bad.group(2)))
            text = f"must be {describe_range(RANGE_TYPES[m.group(1)])}"
            text += f", got {value}" if value else f" ({m.group(2)})"
            return f"{key} {text}" if key else text
    leaves: list[tuple[int, str, str | None]] = []
    context: tuple[int, str] | None = None
    for ln in body:
        indent = len(ln) - len(ln.lstrip())
        text = ln.strip().removeprefix("- ")
        if context is not None and indent <= context[0]:
            context = None
        cp = re.fullmatch(r"Problem with given class_path '(.+)':", text)
        if cp:
            context = (indent, cp.group(1))
        elif not text.endswith(":") and not _NOISE.fullmatch(text):
            leaves.append((indent, text, context[1] if context else None))
    if not leaves:
        return " ".join(ln.strip() for ln in lines)
    _, text, where = max(leaves, key=lambda leaf: leaf[0])  # the first of the deepest
    if where:
        text += f" ({where})"
    elif given and given not in text and len(given) <= 80:
        text += f"; given: {given}"
    return f"{key}: {text}" if key else text
