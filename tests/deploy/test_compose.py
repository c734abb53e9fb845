"""The production topology, checked without a Docker engine.

docker-compose.yml is validated against the Compose Specification's JSON Schema
(tests/deploy/compose-spec.json: compose-spec/compose-spec, schema/compose-spec.json at
commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0; the schema `docker compose`
validates with), raw and after interpolation with .env.example's values, the way
`docker compose config` interpolates. deploy/dagster.yaml and deploy/workspace.yaml are
validated with Dagster's own config schemas. Postgres storage itself is exercised for
real in test_postgres_storage.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = Path(__file__).with_name("compose-spec.json")
ENV_EXAMPLE = REPO / ".env.example"
DAGSTER_YAML = REPO / "deploy" / "dagster.yaml"
WORKSPACE_YAML = REPO / "deploy" / "workspace.yaml"

SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")
# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err},
# ${VAR:+alt}, ${VAR+alt}, $VAR: the Compose Specification's interpolation syntax.
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution over every string value of a loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"]
        val = env.get(name)
        if op in (":-", "-"):
            return val if (val if op == ":-" else val is not None) else arg
        if op in (":?", "?"):
            if (not val) if op == ":?" else val is None:
                raise KeyError(f"${{{name}}} is required: {arg}")
            return val
        if op in (":+", "+"):
            return arg if (val if op == ":+" else val is not None) else ""
        return val or ""

    return INTERPOLATION.sub(sub, value)


def referenced_variables(text: str) -> set[str]:
    return {m["braced"] or m["named"] for m in INTERPOLATION.finditer(text) if not m["escaped"]}


def schema_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def test_compose_file_matches_the_compose_specification():
    raw = load_compose()
    assert schema_errors(raw) == []
    resolved = interpolate(raw, env_example())
    assert schema_errors(resolved) == []
    # The schema is the real one: it rejects what `docker compose` rejects.
    broken = {**resolved, "services": {"x": {"image": "a", "port": ["80:80"]}}}
    assert schema_errors(broken)


def test_the_topology_has_its_services():
    services = load_compose()["services"]
    assert {
        "postgres",
        "objectstore",
        "mlflow",
        "user-code",
        "dagster-webserver",
        "dagster-daemon",
        "trainer",
    } <= set(services)
    # Every profile-less service starts with `docker compose up`; the GPU one does not.
    assert [name for name, svc in services.items() if svc.get("profiles")] == ["trainer"]


def _published(services: dict) -> dict[str, list]:
    return {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}


@pytest.mark.parametrize("env_source", ["env.example", "secrets only"])
def test_published_ports_bind_to_loopback_by_default(env_source):
    env = env_example()
    if env_source == "secrets only":  # a .env holding the required values and nothing else
        env = {k: v for k, v in env.items() if SECRET_NAME.search(k) or k == "POSTGRES_USER"}
    published = _published(interpolate(load_compose(), env)["services"])
    assert set(published) == {"dagster-webserver", "mlflow", "objectstore"}
    for name, ports in published.items():
        for port in ports:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                ip, _host, _container = str(port).split(":")
                assert ip == "127.0.0.1", (name, port)
    ports = {n: [str(p).split(":", 1)[1] for p in ps] for n, ps in published.items()}
    assert ports == {
        "dagster-webserver": ["3000:3000"],
        "mlflow": ["5000:5000"],
        "objectstore": ["8333:8333"],
    }


def test_trainer_reserves_an_nvidia_gpu_behind_the_gpu_profile():
    trainer = load_compose()["services"]["trainer"]
    assert trainer["profiles"] == ["gpu"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cmd = trainer["command"]
    assert cmd[:3] == ["python", "-m", "models.diffusion.train"]
    source = (REPO / "models" / "diffusion" / "train.py").read_text()
    for flag in [c for c in cmd if c.startswith("--")]:
        assert f'add_argument("{flag}"' in source, f"models.diffusion.train has no {flag}"


def test_every_secret_comes_from_the_environment():
    text = COMPOSE.read_text()
    example = env_example()
    secret_vars = {k for k in example if SECRET_NAME.search(k)}
    assert secret_vars == {"POSTGRES_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"}
    # .env.example holds placeholders only, and no secret variable has a default.
    assert all(example[k].startswith("change-me") for k in secret_vars)
    for m in INTERPOLATION.finditer(text):
        if (m["braced"] or "") in secret_vars:
            assert m["op"] in (None, ":?", "?"), f"a default for a secret: {m[0]}"

    # Fill each secret with a sentinel: every secret-named setting must carry one.
    sentinels = {k: f"sentinel-{i}-{k.lower()}" for i, k in enumerate(sorted(secret_vars))}
    resolved = interpolate(load_compose(), {**example, **sentinels})
    for name, svc in resolved["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert str(value) in sentinels.values(), f"{name}: {key} is a literal"
            elif "@" in str(value):  # credentials inside a URL
                assert sentinels["POSTGRES_PASSWORD"] in str(value), f"{name}: {key}"
    seaweed = json.loads(resolved["configs"]["seaweedfs-s3-identities"]["content"])
    (cred,) = seaweed["identities"][0]["credentials"]
    assert cred == {
        "accessKey": sentinels["S3_ACCESS_KEY_ID"],
        "secretKey": sentinels["S3_SECRET_ACCESS_KEY"],
    }
    # Nothing secret in the Dagster instance file either: only env references.
    pg = yaml.safe_load(DAGSTER_YAML.read_text())["storage"]["postgres"]["postgres_db"]
    assert pg["password"] == {"env": "DAGSTER_PG_PASSWORD"}


def test_env_file_is_not_committed():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "--", ".env", ".pg"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert tracked == []
    dockerignore = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".git", ".venv", ".venv-dvc", "data", ".pg"} <= set(dockerignore)


def test_every_variable_is_documented_in_env_example():
    assert referenced_variables(COMPOSE.read_text()) <= set(env_example())


def test_third_party_images_are_pinned():
    images = {n: s["image"] for n, s in load_compose()["services"].items() if "image" in s}
    ours = {n for n, img in images.items() if img.startswith("${RECAPFLOW_IMAGE")}
    assert {"mlflow", "user-code", "dagster-webserver", "dagster-daemon", "trainer"} <= ours
    for name, image in images.items():
        if name in ours:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: {image} unpinned"
        assert "minio" not in repo  # MinIO's open source edition is archived
    assert images["objectstore"].startswith("chrislusf/seaweedfs:")


def test_dagster_instance_yaml_is_valid_postgres_storage(tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    config = yaml.safe_load(DAGSTER_YAML.read_text())
    pg = config["storage"]["postgres"]["postgres_db"]
    for field, var in [
        ("hostname", "DAGSTER_PG_HOST"),
        ("port", "DAGSTER_PG_PORT"),
        ("username", "DAGSTER_PG_USERNAME"),
        ("password", "DAGSTER_PG_PASSWORD"),
        ("db_name", "DAGSTER_PG_DB"),
    ]:
        assert pg[field] == {"env": var}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert config["concurrency"]["runs"]["max_concurrent_runs"] >= 1
    assert config["telemetry"] == {"enabled": False}

    # Dagster's own schema check (no connection is made). Env sources must resolve.
    for var, value in [
        ("DAGSTER_PG_HOST", "postgres"),
        ("DAGSTER_PG_PORT", "5432"),
        ("DAGSTER_PG_USERNAME", "u"),
        ("DAGSTER_PG_PASSWORD", "p"),
        ("DAGSTER_PG_DB", "dagster"),
    ]:
        monkeypatch.setenv(var, value)
    shutil.copy(DAGSTER_YAML, tmp_path / "dagster.yaml")
    validated, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert validated["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"

    # Every Dagster service gets the variables the file reads.
    services = interpolate(load_compose(), env_example())["services"]
    for name in ("user-code", "dagster-webserver", "dagster-daemon"):
        env = services[name]["environment"]
        assert {ref["env"] for ref in pg.values() if isinstance(ref, dict)} <= set(env), name


def test_daemon_sets_the_gpu_pool_limit():
    daemon = load_compose()["services"]["dagster-daemon"]
    script = " ".join(daemon["command"])
    assert "dagster instance concurrency set gpu" in script
    assert "dagster-daemon run -w /opt/dagster/home/workspace.yaml" in script
    # The pool the diffusion model sits in.
    assert 'pool="gpu"' in (REPO / "assets" / "diffusion_model.py").read_text()


def test_workspace_points_at_the_code_server():
    from dagster._core.workspace.config_schema import ensure_workspace_config

    workspace = ensure_workspace_config(
        yaml.safe_load(WORKSPACE_YAML.read_text()), str(WORKSPACE_YAML)
    )
    (location,) = workspace["load_from"]
    grpc = location["grpc_server"]
    services = load_compose()["services"]
    code = services[grpc["host"]]["command"]
    assert code[:3] == ["dagster", "code-server", "start"]
    assert code[code.index("-p") + 1] == str(grpc["port"])
    assert code[code.index("-m") + 1] == "pipelines.definitions"
    assert (REPO / "pipelines" / "definitions.py").exists()
    assert code[code.index("--location-name") + 1] == grpc["location_name"]
    web = services["dagster-webserver"]["command"]
    assert web[web.index("-w") + 1] == "/opt/dagster/home/workspace.yaml"


def test_dockerfile_installs_the_project_with_constraints():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base[1])
    assert "pip install -c constraints.txt -e ." in dockerfile
    assert "cp deploy/dagster.yaml deploy/workspace.yaml /opt/dagster/home/" in dockerfile
    assert "DAGSTER_HOME=/opt/dagster/home" in dockerfile
    assert "USER recapflow" in dockerfile  # not root
