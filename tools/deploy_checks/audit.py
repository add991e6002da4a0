"""pip-audit's verdict on deploy/requirements.lock: findings fail; an advisory service that
cannot be reached is a skip, said out loud, never a pass."""

import json
import re
from pathlib import Path

# What pip-audit (requests/urllib3) says when it cannot reach the advisory service.
UNREACHABLE = re.compile(
    r"ConnectionError|NameResolutionError|Failed to resolve|Max retries exceeded|"
    r"Connection refused|Network is unreachable|timed out|ReadTimeout|ConnectTimeout"
)


def audit_verdict(report: str, log: str, status: str, skip_file: str) -> bool:
    """True when every dependency was audited and none has a known vulnerability, or (with
    the reason written to ``skip_file``) when the service could not answer for any."""
    log_text = Path(log).read_text(encoding="utf-8", errors="replace")
    try:
        dependencies = json.loads(Path(report).read_text(encoding="utf-8"))["dependencies"]
    except (OSError, ValueError, KeyError, TypeError):
        match = UNREACHABLE.search(log_text)
        if match is not None:
            Path(skip_file).write_text(
                f"the advisory service could not be reached ({match.group(0)})", encoding="utf-8"
            )
            return True
        print(f"pip-audit exited {status} without a report:\n{log_text[-3000:]}")
        return False
    vulnerable = [d for d in dependencies if d.get("vulns")]
    for dependency in vulnerable:
        for vuln in dependency["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            aliases = ", ".join(vuln.get("aliases") or [])
            print(
                f"{dependency['name']}=={dependency['version']}: {vuln['id']}"
                f"{f' ({aliases})' if aliases else ''}; fixed in: {fixes}"
            )
    if vulnerable:
        print("act on it: docs/SECURITY.md, 'A vulnerable dependency'")
        return False
    unaudited = [d for d in dependencies if d.get("skip_reason")]
    if dependencies and len(unaudited) == len(dependencies):
        Path(skip_file).write_text(
            f"the advisory service answered for none of the {len(dependencies)} dependencies "
            f"(e.g. {unaudited[0]['skip_reason']}); BROKER_AUDIT_SERVICE=osv asks OSV.dev "
            "instead",
            encoding="utf-8",
        )
        return True
    if unaudited:
        for dependency in unaudited:
            print(f"{dependency['name']}: {dependency['skip_reason']}")
        print(f"{len(unaudited)} of {len(dependencies)} dependencies could not be audited")
        return False
    if status != "0":
        print(f"pip-audit exited {status}:\n{log_text[-3000:]}")
        return False
    print(f"{len(dependencies)} dependencies audited, none with a known vulnerability")
    return True
