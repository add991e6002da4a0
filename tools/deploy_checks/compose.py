"""docker-compose.yml, from `docker-compose config --format json`. Standard library only."""

import json
import pathlib


def compose_demo(compose_json: str, out_dir: str) -> bool:
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
