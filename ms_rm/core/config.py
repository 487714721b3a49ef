"""Reading typed values out of config mappings, with errors that name the source and the key, and
the checks every argument check of ms_rm shares (is_int, is_number: never a bool).

Shared by every config class of ms_rm (backbones, reward models, encoders). Reading the files
themselves is ms_rm.io.files' job.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import numpy as np

from .errors import ConfigError

MAX_SIZE = 1 << 16     # no width, head count, length or channel count of these models comes near it
MISSING = object()     # `default` of a key that must be present


def is_int(value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> bool:
    """An integer (Python's or numpy's, never a bool), within minimum..maximum where they are given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def is_number(value: Any, finite: bool = True) -> bool:
    """A real number (int or float, Python's or numpy's, never a bool), finite unless finite=False."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return not finite or bool(np.isfinite(value))


def get_value(d: Mapping, key: str, kind, source: str, default: Any = MISSING):
    """d[key] checked against `kind` (a type or tuple of types); ConfigError names source and key.

    A key that is absent (or null, when a default is given) takes `default`. bool is never
    accepted for a number nor a number for a bool; an int is accepted (as a float) for a float.
    """
    if key not in d or d[key] is None and default is not MISSING:
        if default is MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise ConfigError(f"{source}: key '{key}' must be {names}, got {value!r}")
    return value


def int_tuple(d: Mapping, key: str, source: str, default: Any = MISSING) -> Tuple[int, ...]:
    """d[key] as a tuple of integers."""
    value = get_value(d, key, (list, tuple), source, default)
    if not all(is_int(v) for v in value):
        raise ConfigError(f"{source}: key '{key}' must be a list of integers, got {value!r}")
    return tuple(value)


def positive(value: int, key: str, source: str, limit: int = MAX_SIZE) -> int:
    """value, if it lies in 1..limit."""
    if not 0 < value <= limit:
        raise ConfigError(f"{source}: key '{key}' must be in 1..{limit}, got {value}")
    return value


def no_unknown(d: Mapping, known, source: str) -> None:
    """ConfigError listing the keys of d that are not in `known`."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; expected only {sorted(known)}")
