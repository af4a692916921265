"""JSON files of the study: cached results, recorded settings."""

from __future__ import annotations

import json
import os


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def write_json(path: str, value: dict):
    with open(path, "w") as fh:
        json.dump(value, fh, indent=2)
