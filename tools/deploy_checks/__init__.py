"""The Python side of `.ci/deploy-checks.sh`: checks that need more than a shell.

Run as `python -m tools.deploy_checks <check> args...` (see `__main__`): exit status 0 when the
check passed, 1 when it failed, with what it found on stdout. Two interpreters run them:

- the tools' venv of `.ci/deploy-checks.sh` (PyYAML, jsonschema, promql-parser, packaging; no
  broker): `image`, `compose`, `pod`, `monitoring`, `documentation`;
- the image's runtime venv (broker and its locked dependencies, nothing else): `introspect`,
  which imports broker and therefore no third-party module the image lacks.

Nothing here imports another interpreter's modules; this package's `__init__` imports nothing.
"""
