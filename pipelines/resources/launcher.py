"""Where a training process runs: a launcher resource wrapping Dagster's Pipes clients.

`subprocess` (default): a local process (`PipesSubprocessClient`). `docker`: a container
with GPUs requested (`dagster_docker.PipesDockerClient`). `k8s`: a pod with
`nvidia.com/gpu` limits (`dagster_k8s.PipesK8sClient`). Whichever, the process is
`python -m <module>` with its config passed as a Pipes extra, and it reports logs and
the final materialization back through Pipes. docs/training.md shows the settings.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import dagster as dg

LAUNCHERS = ("subprocess", "docker", "k8s")


class LauncherError(RuntimeError):
    pass


class TrainingLauncher(dg.ConfigurableResource):
    kind: str = "subprocess"
    python: str = sys.executable  # subprocess: the interpreter of this code location
    image: str | None = None  # docker / k8s: an image with this repo installed
    gpus: int = 1  # docker / k8s: GPUs requested for the container / pod
    namespace: str = "default"  # k8s
    env: dict[str, str] = {}  # noqa: RUF012 (a pydantic field: copied per instance)

    def _command(self, module: str) -> list[str]:
        python = self.python if self.kind == "subprocess" else "python"
        return [python, "-m", module]

    def run(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        extras: dict[str, Any],
        cwd: str,
    ) -> dg.PipesClientCompletedInvocation:
        if self.kind not in LAUNCHERS:
            raise LauncherError(f"unknown launcher kind {self.kind!r}; expected {LAUNCHERS}")
        command = self._command(module)
        if self.kind == "subprocess":
            client = dg.PipesSubprocessClient(cwd=cwd, env={**os.environ, **self.env})
            return client.run(command=command, context=context, extras=extras)
        if not self.image:
            raise LauncherError(f"the {self.kind} launcher needs `image` (this repo installed)")
        if self.kind == "docker":
            try:
                import docker
                from dagster_docker import PipesDockerClient
            except ImportError as e:
                raise LauncherError(
                    "the docker launcher needs dagster-docker: pip install -e '.[docker]'"
                ) from e
            gpu = docker.types.DeviceRequest(count=self.gpus, capabilities=[["gpu"]])
            return PipesDockerClient().run(
                context=context,
                image=self.image,
                command=command,
                extras=extras,
                env=self.env,
                container_kwargs={"device_requests": [gpu]} if self.gpus else {},
            )
        try:
            from dagster_k8s import PipesK8sClient
        except ImportError as e:
            raise LauncherError(
                "the k8s launcher needs dagster-k8s: pip install -e '.[k8s]'"
            ) from e
        limits = {"nvidia.com/gpu": str(self.gpus)} if self.gpus else {}
        return PipesK8sClient().run(
            context=context,
            image=self.image,
            command=command,
            extras=extras,
            namespace=self.namespace,
            env=self.env,
            base_pod_spec={"containers": [{"name": "trainer", "resources": {"limits": limits}}]},
        )
