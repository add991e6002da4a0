"""``SIGHUP``: read the configuration file again and apply what can change live — the clients.

A new file is validated in full, as at start-up; a file that does not validate is refused (the
log names the setting, never a value) and the running clients stay. Accepted clients replace
the running ones in one step (:meth:`broker.auth.Authenticator.replace`): requests in flight
finish with the client they authenticated as. Other settings that changed are logged as
``needs_restart`` and left as they were.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import structlog

from broker import audit
from broker.auth import Authenticator
from broker.config import ClientSettings, Settings, load_settings
from broker.errors import ConfigError
from broker.metrics import Metrics

log = structlog.get_logger(__name__)

Outcome = Literal["applied", "unchanged", "refused"]
LIVE = ("clients",)


class Reloader:
    """Re-reads ``path`` (if any) and the process's environment on demand."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        running: Settings,
        authenticator: Authenticator,
        metrics: Metrics,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._path = path
        self._running = running  # as loaded at start-up (before provider discovery)
        self._authenticator = authenticator
        self._metrics = metrics
        self._environ = environ

    def reload(self) -> Outcome:
        """Apply the file's clients, or refuse the file; never raises."""
        try:
            new = load_settings(self._path, self._environ)
        except ConfigError as err:
            return self._done("refused", setting=err.setting, problem=str(err))
        except Exception as err:  # an unreadable file, a bug: keep serving what runs
            log.exception("config.reload_failed")
            return self._done("refused", setting="config", problem=type(err).__name__)
        needs_restart = changed_settings(self._running, new)
        old = {client.name: client for client in self._authenticator.clients}
        fresh = {client.name: client for client in new.clients}
        changes = {
            "clients_added": sorted(fresh.keys() - old.keys()),
            "clients_removed": sorted(old.keys() - fresh.keys()),
            "clients_changed": sorted(
                name for name in fresh.keys() & old.keys() if not _same(fresh[name], old[name])
            ),
        }
        if not any(changes.values()):
            return self._done("unchanged", needs_restart=needs_restart)
        self._authenticator.replace(new.clients)
        return self._done("applied", needs_restart=needs_restart, **changes)

    def _done(self, outcome: Outcome, **fields: object) -> Outcome:
        self._metrics.config_reloads.labels(outcome).inc()
        audit.record(
            audit.CONFIG_RELOAD,
            client=None,
            provider=None,
            user_id=None,
            outcome=outcome,
            path=None if self._path is None else str(self._path),
            **fields,
        )
        if fields.get("needs_restart"):
            log.warning(
                "config.needs_restart",
                settings=fields["needs_restart"],
                detail="changed in the file but applied only at start-up: restart to apply",
            )
        return outcome


def changed_settings(running: Settings, new: Settings) -> list[str]:
    """Settings but the clients whose value differs (a throwaway encryption key always does)."""
    names = [name for name in Settings.model_fields if name not in LIVE]
    if running.ephemeral_encryption_key and new.ephemeral_encryption_key:
        names.remove("encryption_keys")
    return [name for name in names if getattr(running, name) != getattr(new, name)]


def _same(a: ClientSettings, b: ClientSettings) -> bool:
    return a.model_dump() == b.model_dump()
