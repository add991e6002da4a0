"""What broker shows that must never hold a secret, collected from every answer of the run.

``check_answers`` (tests/contract.py) hands each answer of a test broker to :func:`record`:
problem bodies, ``/metrics`` scrapes, grant statuses, health and readiness answers, and their
headers, all but the answers whose job is to hand out a token or an authorization ``state``.
They go to one file; at the end of the session no secret of the run may appear in it, as none
may appear in the log file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

# Answers that carry a secret by design: access tokens and the authorization's state.
HANDS_OUT = re.compile(r"^/v1/(tokens|app-tokens|authorizations)/")


class Exposure:
    def __init__(self) -> None:
        self.path: Path | None = None
        self.answers = 0

    def record(
        self, method: str, raw_path: str, status: int, headers: Mapping[str, str], body: bytes
    ) -> None:
        if self.path is None or (status < 300 and HANDS_OUT.match(raw_path)):
            return
        head = "".join(f"{name}: {value}\n" for name, value in headers.items())
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(f"== {method} {raw_path} {status}\n{head}")
            stream.write(body.decode("utf-8", errors="replace") + "\n")
        self.answers += 1


EXPOSURE = Exposure()


def leaked(secrets: Iterable[str], text: str) -> list[str]:
    """The secrets (8 characters or more) that ``text`` holds."""
    return sorted(s for s in secrets if len(s) >= 8 and s in text)
