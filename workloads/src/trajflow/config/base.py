"""The base of every config model: camelCase keys in values files; unknown keys, values of
another type and non-finite numbers rejected."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
        frozen=True,
        # YAML spells them .inf and .nan; no setting means either (an infinite interval
        # kills a thread, an infinite rate turns every episode into one frame)
        allow_inf_nan=False,
        # no coercion ('25' or true for a number), as the charts' values.schema.json: the
        # workloads refuse what `helm install` refuses (an integer still counts as a number)
        strict=True,
    )
