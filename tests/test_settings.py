"""Settings: every field documented in the README's table, and ``from_env`` parsing with clear errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bucketlens.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def documented_variables() -> list[str]:
    """The first cell of each row of the README's settings table."""
    return re.findall(r"^\| `(BUCKETLENS_[A-Z0-9_]+)` \|", README.read_text(), flags=re.MULTILINE)


def test_every_field_is_in_the_readme_table_and_nothing_else() -> None:
    fields = [f"BUCKETLENS_{field.name.upper()}" for field in dataclasses.fields(Settings)]
    documented = documented_variables()
    assert sorted(set(fields) - set(documented)) == [], "add these settings to README.md's settings table"
    assert sorted(set(documented) - set(fields)) == [], "README.md documents settings that do not exist"
    assert len(documented) == len(set(documented)), "a setting is documented twice"


def test_from_env_parses_each_type() -> None:
    settings = Settings.from_env({
        "BUCKETLENS_API_PORT": "8000", "BUCKETLENS_HALF": "off", "BUCKETLENS_SNAPSHOT_S3": "Yes",
        "BUCKETLENS_FETCH_TIMEOUT_S": "2.5", "BUCKETLENS_HOME": "/srv/bl", "BUCKETLENS_NAMESPACE": "prod",
        "OTHER": "ignored",
    })
    assert settings.api_port == 8000 and settings.half is False and settings.snapshot_s3 is True
    assert settings.fetch_timeout_s == 2.5 and settings.home == Path("/srv/bl") and settings.namespace == "prod"
    assert settings.batch_size == Settings().batch_size  # unset fields keep their defaults


def test_overrides_win_and_to_env_round_trips() -> None:
    settings = Settings.from_env({"BUCKETLENS_API_PORT": "8000"}, api_port=9000, half=False)
    assert settings.api_port == 9000
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(("variable", "raw", "kind"), [
    ("BUCKETLENS_API_PORT", "80a", "int"),
    ("BUCKETLENS_BATCH_SIZE", "3.5", "int"),
    ("BUCKETLENS_HALF", "maybe", "bool"),
    ("BUCKETLENS_FETCH_TIMEOUT_S", "soon", "float"),
])
def test_bad_values_are_refused_with_the_variable_named(variable: str, raw: str, kind: str) -> None:
    with pytest.raises(ValueError, match=f"^{variable}='{re.escape(raw)}' is not a valid {kind}$"):
        Settings.from_env({variable: raw})
