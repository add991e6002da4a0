"""The sources ``Settings()`` reads beyond its arguments: none, but while config builds it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pydantic_settings import PydanticBaseSettingsSource

# Sources that ``broker.config.build_settings`` layers under the constructor's arguments (the
# environment over the TOML document) while it builds settings; none otherwise.
_LAYERS: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar("layers", default=())


@contextmanager
def layered(*sources: PydanticBaseSettingsSource) -> Iterator[None]:
    """Within the block, ``Settings()`` reads ``sources`` (the first wins)."""
    token = _LAYERS.set(sources)
    try:
        yield
    finally:
        _LAYERS.reset(token)


def layers() -> tuple[PydanticBaseSettingsSource, ...]:
    return _LAYERS.get()
