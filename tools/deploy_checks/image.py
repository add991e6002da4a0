"""The container image's inputs: deploy/Dockerfile, .dockerignore, deploy/requirements.lock.

Run with the tools' venv (packaging).
"""

import json
import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def lock_matches_pyproject(pyproject: str, lock: str) -> bool:
    """Every dependency of pyproject.toml is pinned in the lock, within its range."""
    pins: dict[str, str] = {}
    for line in pathlib.Path(lock).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    bad = []
    deps: list[str] = tomllib.loads(pathlib.Path(pyproject).read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name not in pins:
            bad.append(f"{req.name}: not in {lock}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            bad.append(f"{req.name}=={pins[name]} in {lock} is outside {req.specifier}")
    for problem in bad:
        print(problem)
    if bad:
        print("run .ci/deploy-checks.sh relock")
    print(f"{len(deps)} dependencies, {len(pins)} pins")
    return not bad


def dockerignore_allows_copies(dockerfile: str, dockerignore: str) -> bool:
    """Each COPY source of the build context exists and is allowed by the .dockerignore
    allow-list (a `*` rule followed by `!path` exceptions)."""
    allowed = [
        line[1:].strip().rstrip("/")
        for line in pathlib.Path(dockerignore).read_text().splitlines()
        if line.startswith("!")
    ]
    text = re.sub(r"\\\n", " ", pathlib.Path(dockerfile).read_text())
    ok = True
    copies = 0
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        if any(w.startswith("--from") for w in words):
            continue
        for src in [w for w in words[1:-1] if not w.startswith("--")]:
            copies += 1
            if not pathlib.Path(src).exists():
                print(f"{src}: copied by {dockerfile}, does not exist")
                ok = False
            if not any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed):
                print(f"{src}: copied by {dockerfile}, but not allowed by {dockerignore}")
                ok = False
    print(f"{copies} sources copied from the build context")
    return ok and copies > 0


def healthcheck_is_python(dockerfile: str) -> bool:
    """The Dockerfile's HEALTHCHECK is an exec-form `python -c` command that compiles; prints
    the script."""
    text = re.sub(r"\\\n", " ", pathlib.Path(dockerfile).read_text())
    found = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    if found is None:
        print(f"{dockerfile}: no exec-form HEALTHCHECK ... CMD [...]")
        return False
    cmd = json.loads(found.group(1))
    assert cmd[:2] == ["python", "-c"], cmd
    compile(cmd[2], "HEALTHCHECK", "exec")
    print(cmd[2])
    return True
