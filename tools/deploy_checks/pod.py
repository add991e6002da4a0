"""What a broker pod of a rendered chart would see. Run with the tools' venv (PyYAML)."""

import base64
import pathlib
import re

from .manifests import docs


def rendered_config(render: str, out_dir: str, init_script_out: str) -> bool:
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

    def secret_data(name: str) -> dict[str, str] | None:
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
    env: dict[str, str] = {}
    for e in broker.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            referenced = secret_data(ref["name"])
            if referenced and ref["key"] in referenced:
                env[e["name"]] = referenced[ref["key"]]
            elif e["name"] == "BROKER_REDIS_URL":
                env[e["name"]] = "redis://:stand-in@redis.invalid:6379/0"
            else:
                env[e["name"]] = "ci-stand-in"
    (out / "broker.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    # The file paths in broker.toml are absolute: point them at fs/.
    return True
