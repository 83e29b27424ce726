"""The surfaces a shop's pages ask the lookup API for, each with its k and its rules, named
in one TOML file (`surfaces_file`; docs/contracts.md, "Surfaces"):

    [surfaces.for_you]          # the list published on the recommendations topic
    kind = "user"
    rules = { max_per_category = 3 }

    [surfaces.similar]          # an item page: what follows this item
    kind = "similar"
    k = 12
    rules = { exclude_categories = ["gift cards"] }

    [surfaces.trending]
    kind = "trending"

    [surfaces.after_search]     # the user's list right after a search
    kind = "search"

Kinds: `user` (a user's list; `for_you` is the one published on the output topic, so its k
is the `top_k` setting), `similar` (an item's neighbours), `trending` (recency-weighted
popularity, optionally of a category) and `search` (a user plus a query). Without a file,
one surface of each kind without rules. A file that does not validate stops the worker at
start with one line naming the file, the surface and the field.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.rules import MAX_BOOST_WEIGHT, Boost, Rules
from stream_app.errors import UserError

KINDS = ("user", "similar", "trending", "search")
OUTPUT = "for_you"  # the surface published on the recommendations topic
MAX_K = 1000


class BoostSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attribute: str = Field(min_length=1, max_length=64)
    value: bool | float | str
    weight: float = Field(ge=-MAX_BOOST_WEIGHT, le=MAX_BOOST_WEIGHT)


class RulesSpec(BaseModel):
    """model/rules.py `Rules` as a configuration file or a JSON body spells them."""
    model_config = ConfigDict(extra="forbid")
    categories: list[str] = Field(default_factory=list, max_length=100)
    exclude_categories: list[str] = Field(default_factory=list, max_length=100)
    price_min: float | None = Field(None, allow_inf_nan=False)
    price_max: float | None = Field(None, allow_inf_nan=False)
    exclude: list[str] = Field(default_factory=list, max_length=200)
    max_per_category: int = Field(0, ge=0, le=MAX_K)
    boost: list[BoostSpec] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _prices_in_order(self) -> "RulesSpec":
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min {self.price_min:g} is above price_max {self.price_max:g}")
        return self

    def rules(self) -> Rules:
        return Rules(categories=tuple(self.categories), exclude_categories=tuple(self.exclude_categories),
                     price_min=self.price_min, price_max=self.price_max, exclude=frozenset(self.exclude),
                     max_per_category=self.max_per_category,
                     boost=tuple(Boost(b.attribute, b.value, b.weight) for b in self.boost))


class SurfaceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["user", "similar", "trending", "search"]
    k: int | None = Field(None, ge=1, le=MAX_K)
    rules: RulesSpec = Field(default_factory=RulesSpec)


class SurfacesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    surfaces: dict[str, SurfaceSpec]


@dataclass(frozen=True, slots=True)
class Surface:
    name: str
    kind: str
    k: int
    rules: Rules


DEFAULT = {OUTPUT: "user", "similar": "similar", "trending": "trending", "after_search": "search"}


def load(path: Path | None, top_k: int) -> dict[str, Surface]:
    """The configured surfaces by name (the defaults without a file); always has `for_you`."""
    if path is None:
        return {name: Surface(name, kind, top_k, Rules()) for name, kind in DEFAULT.items()}
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read surfaces_file {path} ({exc.strerror or exc}); fix STREAMREC_SURFACES_FILE") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"surfaces_file {path} is not valid TOML ({exc}); fix the file") from None
    try:
        spec = SurfacesFile.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"surfaces_file {path}: {where}: {err['msg']}; fix the file "
                        "(docs/contracts.md, Surfaces)") from None
    out = {}
    for name, s in spec.surfaces.items():
        if not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise UserError(f"surfaces_file {path}: surface name {name[:40]!r} must be 1-64 letters, digits, "
                            "'_' or '-'; rename it")
        if name == OUTPUT and (s.kind != "user" or s.k is not None):
            raise UserError(f"surfaces_file {path}: {OUTPUT} is the published list: kind must be \"user\" and its "
                            "k is the top_k setting; remove k or set STREAMREC_TOP_K")
        out[name] = Surface(name, s.kind, s.k or top_k, s.rules.rules())
    if OUTPUT not in out:
        out[OUTPUT] = Surface(OUTPUT, "user", top_k, Rules())
    return out
