"""Generated recipes never make `refit validate` raise: random YAML values in every field, of any
type, unknown keys, huge numbers, unicode and path-like names end in exit 0, or exit 2 with every
problem listed (property-based, Hypothesis)."""

from __future__ import annotations

import yaml
from conftest import BASE_RECIPE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refit.flows.cli import main as refit
from refit.stages.core.config import Recipe

NAMES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["..", ".", "a/b", "../x", "report.json", "state.sqlite", "é" * 300, "NUL\x00", "x" * 400]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    NAMES,
    st.sampled_from(["2M", "1e999", "-3", "0x10", "1.5B", "file://x", "memory://x", "foo://x", "s3://b/x"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(NAMES, inner, max_size=4)),
    max_leaves=12,
)
SECTIONS = list(Recipe.model_fields)


def _field_names(section: str) -> list[str]:
    """The fields of a recipe section's class (the first model in its annotation), for
    generating values under real keys as well as unknown ones."""
    annotation = Recipe.model_fields[section].annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        inner = getattr(candidate, "__args__", (candidate,))[0] if getattr(candidate, "__origin__", None) else candidate
        if isinstance(inner, type) and hasattr(inner, "model_fields"):
            return list(inner.model_fields)
    return []


@st.composite
def recipes(draw) -> dict:
    recipe = dict(BASE_RECIPE)
    for section in draw(st.lists(st.sampled_from(SECTIONS + ["unknown_section"]), max_size=4, unique=True)):
        fields = _field_names(section) if section in SECTIONS else []
        if fields and draw(st.booleans()):
            keys = st.one_of(st.sampled_from(fields), NAMES)
            recipe[section] = draw(st.dictionaries(keys, VALUES, max_size=4))
        else:
            recipe[section] = draw(VALUES)
    return recipe


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=recipes())
def test_validate_answers_every_generated_recipe_with_exit_0_or_2(tmp_path, recipe, capsys):
    (tmp_path / "base").mkdir(exist_ok=True)
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir(exist_ok=True)
    for name in ("old", "qa"):
        (tmp_path / "data" / f"{name}.jsonl").write_text("{}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    code = refit(["validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith(f"recipe {path} has ") and "problem" in err
