"""A bounded JSON schema (every output under it ends within ~100 tokens) and its validator,
shared by the engine and the end-to-end structured-output tests."""
from __future__ import annotations

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "pet"],
}


def validate_person(obj) -> None:
    """AssertionError unless obj satisfies PERSON_SCHEMA (strict: no other properties)."""
    assert isinstance(obj, dict)
    assert set(obj) <= set(PERSON_SCHEMA["properties"]) and {"name", "age", "pet"} <= set(obj)
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
    assert obj["pet"] in ("cat", "dog", "none")
    tags = obj.get("tags", [])
    assert isinstance(tags, list) and len(tags) <= 3 and all(isinstance(t, str) and len(t) <= 6 for t in tags)
