"""The local stack's run: start everything in order, show the fleet, stop everything in reverse order.

Start: workdir → signing key → accounts and broker files → broker → agents, fleet manager and refiner
(started together; the models are registered while they load) → devices online → `production` on every
device → canary rollout of the newer version. Stop (Ctrl-C, SIGTERM, the
end of `--duration`, or a child that died): agents, then the refiner, the fleet manager, the broker last,
each SIGTERM first and SIGKILL after `STOP_TIMEOUT_S`; a second Ctrl-C skips the wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from rich.console import Console

from fleet_manager.local_stack.api import ApiError, FleetApi, http_ok
from fleet_manager.local_stack.bootstrap import (
    Models,
    Secrets,
    claim_workdir,
    ensure_signing_key,
    provision,
    register_models,
)
from fleet_manager.local_stack.display import FleetView, StatusLine, Steps, describe_rollout
from fleet_manager.local_stack.plan import (
    HOST,
    MODEL_NAME,
    StackError,
    StackPlan,
    canary_waves,
    mosquitto_conf,
    mosquitto_sub_command,
    refiner_settings,
)
from fleet_manager.local_stack.processes import Child, Supervisor, edgefleet_command

STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 180.0  # a busy two-core laptop starting everything at once is slow
CANARY_PROBATION_S = 5.0
T = TypeVar("T")


class StopRequestedError(Exception):
    """Asked to stop (signal or --duration) while starting."""


class LocalStack:
    def __init__(self, plan: StackPlan, console: Console) -> None:
        self.plan = plan
        self.console = console
        self.steps = Steps(console)
        self.supervisor = Supervisor(STOP_TIMEOUT_S)
        self.stop = threading.Event()
        self.signals = 0
        self.started = time.monotonic()
        self.deadline = self.started + plan.duration_s if plan.duration_s is not None else None
        self.secrets = Secrets()
        self.api = FleetApi(plan.api_url, "")
        self.agents: list[Child] = []
        self.canary_id: str | None = None
        self._canary_phase: tuple[str, int] | None = None

    # ---- the whole run ---------------------------------------------------------------------------------

    def run(self) -> int:
        """0 after a requested stop; 1 when starting failed or a part died; 2: the workdir is not usable."""
        try:
            lock = claim_workdir(self.plan)
        except StackError as error:
            self._error(str(error))
            return 2
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            self._start()
            self._banner()
            code = self._watch()
        except StopRequestedError:
            self.console.print("stopping before the stack was complete")
        except StackError as error:
            self._error(str(error))
            code = 1
        except ApiError as error:
            self._error(
                f"the fleet manager's API failed: {error}; see {self.plan.logs_dir / 'fleet-manager.log'}"
            )
            code = 1
        finally:
            self._shutdown()
            lock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        self.stop.set()

    def _error(self, message: str) -> None:
        self.console.print(f"[red]error:[/red] {message}", highlight=False)

    # ---- starting --------------------------------------------------------------------------------------

    def _start(self) -> None:
        plan = self.plan
        env = _child_env()
        with self.steps.step("signing key") as step:
            step.detail = f"{plan.signing_key} (key id {ensure_signing_key(plan)})"
        with self.steps.step("fleet database, broker accounts, operator token"):
            self.secrets = provision(plan)
            self.api = FleetApi(plan.api_url, self.secrets.operator_token)
        with self.steps.step(f"broker on {HOST}:{plan.broker_port}"):
            self._start_broker(env)
        with self.steps.step("starting the agents, the fleet manager and the refiner") as step:
            for device_id in plan.device_ids:
                self.agents.append(self._spawn_agent(device_id, env))
            self._spawn_fleet_manager(env)
            self._spawn_refiner(env)
            step.detail = ", ".join(c.name for c in self.supervisor.children[1:])
        # Meanwhile: the fleet manager opens the registry only when a rollout is created, and the refiner
        # logs to an MLflow store of its own, so nothing else touches the registry's store as it is made.
        with self.steps.step("model registry") as step:
            models = register_models(plan)
            step.detail = (
                f"{MODEL_NAME} v{models.production} (int8) = production, v{models.canary} (fp32) newer"
            )
        with self.steps.step(f"fleet manager on {plan.api_url}"):
            self._wait("the fleet manager to answer and reach the broker", self._fleet_manager_healthy)
        with self.steps.step("cloud refiner"):
            self._wait("the refiner to be ready", lambda: http_ok(f"{self.plan.refiner_url}/readyz"))
        with self.steps.step(f"{plan.devices} device(s) online"):
            self._wait("the devices to come online", self._all_online)
        with self.steps.step(f"{MODEL_NAME}@production on every device"):
            self._roll_out_production(models)
        if plan.rollout:
            with self.steps.step(f"canary rollout of {MODEL_NAME} v{models.canary}") as step:
                self.canary_id = self._start_canary(models)
                waves = " → ".join(f"{w:g}%" for w in canary_waves(plan.devices))
                step.detail = f"{self.canary_id}, waves {waves}, probation {CANARY_PROBATION_S:g} s"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        return self.supervisor.spawn(name, args, env, self.plan.logs_dir / f"{name}.log")

    def _start_broker(self, env: dict[str, str]) -> None:
        plan = self.plan
        (plan.broker_dir / "data").mkdir(parents=True, exist_ok=True)
        config = plan.broker_dir / "mosquitto.conf"
        config.write_text(mosquitto_conf(plan))
        self._spawn("mosquitto", [plan.mosquitto, "-c", str(config)], env)
        self._wait("the broker to listen", lambda: _listening(HOST, plan.broker_port), timeout=20)

    def _spawn_agent(self, device_id: str, env: dict[str, str]) -> Child:
        config = self.plan.agent_dir(device_id) / "agent.yaml"
        args = [*edgefleet_command(), "agent", "run", "--config", str(config)]
        return self._spawn(device_id, args, {**env, **self.secrets.device_env[device_id]})

    def _spawn_fleet_manager(self, env: dict[str, str]) -> None:
        config = self.plan.workdir / "fleet.yaml"
        secret = {"EDGEFLEET_FLEET_BROKER__PASSWORD": self.secrets.fleet_password}
        args = [*edgefleet_command(), "fleet", "serve", "--config", str(config)]
        self._spawn("fleet-manager", args, env | secret)

    def _fleet_manager_healthy(self) -> bool:
        health = self.api.healthz()
        return health is not None and health.get("mqtt_connected") is True

    def _spawn_refiner(self, env: dict[str, str]) -> None:
        import yaml

        self.plan.refiner_dir.mkdir(exist_ok=True)
        config = self.plan.workdir / "refiner.yaml"
        header = "# Settings of the cloud refiner, generated by `edgefleet up` on every start.\n"
        config.write_text(header + yaml.safe_dump(refiner_settings(self.plan), sort_keys=False))
        secret = {"EDGEFLEET_REFINER_BROKER__PASSWORD": self.secrets.refiner_password}
        args = [*edgefleet_command(), "refiner", "serve", "--config", str(config)]
        self._spawn("refiner", args, env | secret)

    def _all_online(self) -> bool:
        page = self.api.get("/api/v1/devices", group="local", state="online", limit=1000)
        return set(self.plan.device_ids) <= {d["id"] for d in page["items"]}

    def _roll_out_production(self, models: Models) -> None:
        """Every device on the registry's `production` model: a one-wave rollout (a re-run first aborts
        what an earlier run left active)."""
        active = self.api.get("/api/v1/rollouts", state=["pending", "running", "paused"])
        for rollout in active:
            with contextlib.suppress(ApiError):  # e.g. 409: it finished meanwhile
                self.api.post(
                    f"/api/v1/rollouts/{rollout['id']}/abort", {"reason": "edgefleet up started again"}
                )
        rollout = self._create_rollout(
            {
                "model": MODEL_NAME,
                "alias": "production",
                "waves": [100.0],
                "success_threshold": 1.0,
                "probation_s": 0.0,
                "require_telemetry": False,
            }
        )

        def finished() -> dict[str, Any] | None:
            detail: dict[str, Any] = self.api.get(f"/api/v1/rollouts/{rollout}")
            return detail if detail["state"] not in ("pending", "running") else None

        detail = self._wait("the production rollout", finished)
        if detail["state"] != "completed":
            errors = "; ".join(f"{d['device_id']}: {d['error']}" for d in detail["devices"] if d["error"])
            raise StackError(f"the production rollout {rollout} ended {detail['state']}: {errors or '?'}")

    def _start_canary(self, models: Models) -> str:
        return self._create_rollout(
            {
                "model": MODEL_NAME,
                "version": models.canary,
                "waves": canary_waves(self.plan.devices),
                "success_threshold": 1.0,
                "probation_s": CANARY_PROBATION_S,
            }
        )

    def _create_rollout(self, spec: dict[str, Any]) -> str:
        body = {**spec, "target": {"device_ids": self.plan.device_ids}}
        try:
            created = self.api.post("/api/v1/rollouts", body)
        except ApiError as error:
            raise StackError(f"the fleet manager refused the rollout: {error}") from None
        return str(created["id"])

    def _check(self) -> None:
        """Raise StopRequestedError when asked to stop, StackError when a child died."""
        if self.stop.is_set() or self._past_deadline():
            raise StopRequestedError
        crashed = self.supervisor.crashed()
        if crashed is not None:
            raise StackError(_crash_report(crashed))

    def _wait(self, what: str, probe: Callable[[], T | None], timeout: float = START_TIMEOUT_S) -> T:
        """Poll `probe` until it returns something truthy; API errors count as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            self._check()
            try:
                value = probe()
            except ApiError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                logs = self.plan.logs_dir
                raise StackError(
                    f"timed out after {timeout:.0f} s waiting for {what}; the logs are in {logs}"
                )
            self.stop.wait(0.25)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    # ---- running ---------------------------------------------------------------------------------------

    def _banner(self) -> None:
        plan = self.plan
        watch = mosquitto_sub_command(plan, self.secrets.watch_password)
        rows = [
            ("dashboard", f"{plan.api_url}/  (sign in with the operator token)"),
            ("operator token", f"{self.secrets.operator_token}  (also in {plan.token_file})"),
            (
                "REST API",
                f"curl -H 'Authorization: Bearer {self.secrets.operator_token}' "
                f"{plan.api_url}/api/v1/devices",
            ),
            ("watch MQTT", watch),
            ("fleet CLI", f"edgefleet fleet --config {plan.workdir / 'fleet.yaml'} devices"),
            ("logs", f"{plan.logs_dir}/"),
        ]
        self.console.print("\n[bold]edgefleet local stack is up[/bold]", highlight=False)
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            self.console.print(f"  {name:<{width}}  {value}", highlight=False, soft_wrap=True)
        until = f"for {plan.duration_s:g} s in all" if plan.duration_s is not None else "until Ctrl-C"
        self.console.print(f"Running {until}; Ctrl-C stops everything.\n", highlight=False)
        self._write_state()

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "dashboard": f"{self.plan.api_url}/",
            "api": self.plan.api_url,
            "broker": {"host": HOST, "port": self.plan.broker_port},
            "refiner": self.plan.refiner_url,
            "token_file": str(self.plan.token_file),
            "devices": self.plan.device_ids,
            "canary_rollout": self.canary_id,
            "children": {c.name: c.pid for c in self.supervisor.children},
        }
        self.plan.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def _watch(self) -> int:
        crashed: Child | None = None
        with StatusLine(self.console) as status:
            while not self.stop.is_set() and not self._past_deadline():
                crashed = self.supervisor.crashed()
                if crashed is not None:
                    break
                if status.due():
                    self._refresh(status)
                self.stop.wait(0.5)
        if crashed is not None:
            self._error(_crash_report(crashed))
            return 1
        reason = "stop requested" if self.stop.is_set() else f"--duration {self.plan.duration_s:g} s reached"
        self.console.print(f"{reason}: stopping", highlight=False)
        return 0

    def _refresh(self, status: StatusLine) -> None:
        """Show the fleet's figures; a change of the canary's state or wave also prints a line of its own."""
        try:
            view = FleetView.fetch(self.api, self.plan.device_ids, self.canary_id)
        except ApiError as error:
            status.show(None, error)
            return
        if view.rollout is not None:
            phase = (view.rollout["state"], view.rollout["current_wave"])
            if phase != self._canary_phase:
                self._canary_phase = phase
                status.event(f"canary {self.canary_id}: {describe_rollout(view.rollout)}")
        status.show(view)

    # ---- stopping --------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        children = {c.name: c for c in self.supervisor.children}
        tiers = [
            ("agents", self.agents),
            ("refiner", [c for c in (children.get("refiner"),) if c is not None]),
            ("fleet manager", [c for c in (children.get("fleet-manager"),) if c is not None]),
            ("broker", [c for c in (children.get("mosquitto"),) if c is not None]),
        ]
        started = time.monotonic()
        for label, tier in tiers:
            if not any(c.process is not None for c in tier):
                continue
            with self.console.status(f"stopping the {label}"):
                self.supervisor.stop_tier(tier, hurry=lambda: self.signals >= 2)
            outcomes = ", ".join(
                c.outcome if len(tier) == 1 else f"{c.name} {c.outcome}"
                for c in tier
                if c.process is not None
            )
            self._say(f"  {label}: {outcomes}")
        if self.supervisor.children:
            took = time.monotonic() - started
            self._say(f"stopped everything in {took:.1f} s; state kept in {self.plan.workdir}")

    def _say(self, text: str) -> None:
        """Print while stopping: a closed stdout (a pipe whose reader left) must not stop the stopping."""
        with contextlib.suppress(OSError):
            self.console.print(text, highlight=False)


def _child_env() -> dict[str, str]:
    """This environment without EDGEFLEET_* settings (each child gets its own), output unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _crash_report(child: Child) -> str:
    code = child.process.poll() if child.process is not None else None
    tail = "\n".join(child.log_tail().splitlines()[-25:])
    return f"{child.name} exited unexpectedly (code {code}); the end of {child.log_path}:\n{tail}"
