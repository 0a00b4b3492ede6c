"""What a parameter's value must be beyond its type, as a pydantic annotation (`Annotated[int, Rule(..)]`),
so that the error says the allowed range in the project's words ("must be an integer >= 1 (got 0)")."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, GetCoreSchemaHandler
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import PydanticCustomError, core_schema


class Invalid(Exception):
    """A bad value at `path` (e.g. train.batch_size); the reader adds the file's name."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


def did_you_mean(word: object, names: Iterable[object]) -> str:
    """The hint "; did you mean `train`?" for a typo, or "" (cutoff 0.7: no `cpu` for `gpu`)."""
    close = difflib.get_close_matches(str(word), [str(n) for n in names], n=1, cutoff=0.7)
    return f"; did you mean `{close[0]}`?" if close else ""


@dataclass(frozen=True)
class Rule:
    """Bounds and patterns apply to the value, or to each item of a list and each value of a mapping;
    `key_pattern` to a mapping's keys."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    pattern: tuple[str, str] | None = None  # (regular expression, what it means)
    key_pattern: tuple[str, str] | None = None
    min_items: int = 0
    distinct: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(self.validated, handler(source))

    def validated(self, value: Any) -> Any:
        """pydantic's after-validator: the value, or an error carrying the sub-path ("[2]", ".key")."""
        try:
            self.check(value, "")
        except Invalid as exc:
            raise PydanticCustomError(
                "rule", "{message}", {"suffix": exc.path, "message": exc.message}
            ) from None
        return value

    def bounds(self) -> str:
        """The allowed range in words: ">= 1", "> 0", "in [0, 1)", ... ("" when unbounded)."""
        low = self.at_least if self.at_least is not None else self.above
        high = self.at_most if self.at_most is not None else self.below
        closed_low, closed_high = self.at_least is not None, self.at_most is not None
        if low is not None and high is not None:
            return f"in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        if low is not None:
            return f"{'>=' if closed_low else '>'} {low:g}"
        if high is not None:
            return f"{'<=' if closed_high else '<'} {high:g}"
        return ""

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, list | dict):
            self._check_container(value, path)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                self._check_one(item, f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]")
        else:
            self._check_one(value, path)

    def _check_container(self, value: list | dict, path: str) -> None:
        if len(value) < self.min_items:
            raise Invalid(path, f"must list at least {self.min_items} item(s) (got {value!r})")
        if self.distinct and len({repr(v) for v in value}) < len(value):
            raise Invalid(path, f"must list each item once (got {value!r})")
        for key in value if isinstance(value, dict) else ():
            if self.key_pattern and not re.fullmatch(self.key_pattern[0], str(key)):
                raise Invalid(f"{path}.{key}", f"the key must be {self.key_pattern[1]} (got {key!r})")

    def _check_one(self, value: Any, path: str) -> None:
        if self.pattern and not re.fullmatch(self.pattern[0], value):
            raise Invalid(path, f"must be {self.pattern[1]} (got {value!r})")
        if self.bounds() and not (
            math.isfinite(value)
            and (self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
            and (self.below is None or value < self.below)
        ):
            kind = "an integer" if isinstance(value, int) else "a number"
            raise Invalid(path, f"must be {kind} {self.bounds()} (got {value!r})")


# A section of params.yaml: frozen; an unknown key is an error; values are not converted between types
# (Strict* fields; an int is accepted for a float).
section = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))

# Rules and patterns shared by several fields.
NAME = (r"[A-Za-z0-9][-A-Za-z0-9_.]*", "a name of letters, digits, '-', '_' and '.'")
LABEL_KEY = r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
FRACTION = Rule(at_least=0.0, at_most=1.0)
PROBABILITY = Rule(above=0.0, below=1.0)  # strictly between 0 and 1
POSITIVE = Rule(above=0.0)
AT_LEAST_0 = Rule(at_least=0)
AT_LEAST_1 = Rule(at_least=1)
