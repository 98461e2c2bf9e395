"""Multi-host training with Ray: one actor per host, all running `run.train` as one SPMD program over a global
mesh joined by `jax.distributed`. The driver places the actors, receives only their metrics, and when an actor
dies or a step hangs it tears the group down and starts a fresh one that resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from mesh_transformer.config import Config
from mesh_transformer.errors import UserError
from mesh_transformer.run import RunOptions, training_data

# Test hook: "KIND:HOST@STEP" makes host HOST die (SIGKILL) or hang after step STEP, or (KIND "storage") fail
# to write its pieces of the step-STEP checkpoint as GCS does once its retries run out. A comma-separated
# list strikes one group each: the first fault the first group, the second the group that replaced it, ...
FAULT_ENV = "MESH_TRANSFORMER_FAULT"
_FAULT = re.compile(r"^(die|hang|storage):(\d+)@(\d+)$")
_POLL_S = 1.0  # how often the driver looks at the actors and their reports
_INTERRUPT_GRACE_S = 30.0  # after Ctrl-C, how long tearing the group down may take before the driver kills it
# An HTTP/2 client's opening: the fixed preface and an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class ClusterError(UserError):
    """The Ray cluster cannot be used as asked (unreachable address, impossible placement, bad --hosts)."""


@dataclasses.dataclass
class ClusterOptions:
    hosts: int  # actors, one per host; each drives tpu_size / hosts devices
    # HOST:PORT of a running Ray head, "auto", or None: start a private local Ray on 127.0.0.1.
    ray_address: str | None = None
    # Custom resources every actor needs, e.g. {"tpu": 1} when each TPU host was started with
    # `ray start --resources='{"tpu": 1}'`. On a multi-node cluster actors are also spread one per node.
    actor_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    step_timeout_s: float = 900.0  # no train step finished for this long (once one has): the group is hung
    # start, restore, compile and first step of a fresh group; also each evaluation, checkpoint save and
    # sample, which the step timeout does not count
    startup_timeout_s: float = 3600.0
    placement_timeout_s: float = 900.0  # waiting for hosts to (re)appear in the cluster
    max_restarts: int = 5  # consecutive failed groups that committed no new checkpoint
    backoff_s: float = 10.0  # before the first restart; doubles with each consecutive failure
    max_backoff_s: float = 600.0
    fault: str | None = None  # see FAULT_ENV; None reads the environment variable


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # "die", "hang" or "storage"
    host: int
    step: int

    @staticmethod
    def parse(spec: str | None, hosts: int) -> list[Fault]:
        """The faults of `spec`, one per group in order (see FAULT_ENV)."""
        faults = []
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            m = _FAULT.match(item)
            if not m or int(m.group(2)) >= hosts:
                raise ClusterError(
                    f"{FAULT_ENV}={spec!r}: expected KIND:HOST@STEP[,KIND:HOST@STEP...] with KIND die, hang "
                    f"or storage and HOST < {hosts}"
                )
            faults.append(Fault(m.group(1), int(m.group(2)), int(m.group(3))))
        return faults


def parse_resources(text: str) -> dict[str, float]:
    """`tpu=1,ssd=0.5` -> {"tpu": 1.0, "ssd": 0.5}: the custom Ray resources each actor needs."""
    resources = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition("=")
        try:
            value = float(count)
        except ValueError:
            value = -1.0
        if not name.strip() or value <= 0:
            raise ClusterError(
                f"--actor-resources {text!r}: expected NAME=COUNT[,NAME=COUNT...] with positive counts, "
                "e.g. tpu=1"
            )
        resources[name.strip()] = value
    return resources


def check_options(config: Config, cluster: ClusterOptions) -> None:
    """Each host must hold whole model-parallel groups and an equal share of every batch."""
    hosts = cluster.hosts
    if cluster.step_timeout_s <= 0 or cluster.startup_timeout_s <= 0 or cluster.placement_timeout_s <= 0:
        raise ClusterError(
            f"--step-timeout {cluster.step_timeout_s:g}: timeouts must be positive numbers of seconds"
        )
    if cluster.max_restarts < 0:
        raise ClusterError(f"--max-restarts {cluster.max_restarts}: expected 0 or more")
    if cluster.backoff_s < 0:
        raise ClusterError(f"--restart-backoff {cluster.backoff_s:g}: expected 0 or more seconds")
    if hosts < 1:
        raise ClusterError(f"--hosts {hosts}: expected a positive number of hosts")
    if config.tpu_size % hosts or (config.tpu_size // hosts) % config.mp:
        raise ClusterError(
            f"--hosts {hosts}: the config's tpu_size {config.tpu_size} must split into {hosts} equal hosts "
            f"each holding whole model-parallel groups of cores_per_replica={config.mp} devices"
        )
    if config.global_batch % hosts:
        raise ClusterError(
            f"--hosts {hosts}: the global batch of {config.global_batch} sequences does not split evenly"
        )


# Ray is imported inside functions: a local instance stays on 127.0.0.1 only if
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before the first `import ray` (see `connect`).

# --------------------------------------------------------------------------------------------------------
# Inside the actors.
# --------------------------------------------------------------------------------------------------------


class _Reporter:
    """Collects what the actors report (fire-and-forget calls) until the driver drains it: each step's
    metrics, and {"phase": name} when a host turns to work that is not a train step ("train" when back)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict]] = []

    def report(self, process_id: int, metrics: dict) -> None:
        self.records.append((process_id, metrics))

    def drain(self) -> list[tuple[int, dict]]:
        records, self.records = self.records, []
        return records


class HostWorker:
    """One host's process of the SPMD program: joins the global mesh, then runs the ordinary run loop."""

    def __init__(self, process_id: int, num_processes: int, local_devices: int) -> None:
        self.process_id, self.num_processes, self.local_devices = process_id, num_processes, local_devices
        # The raylet passes on the driver's environment; a forced CPU device count there (the test session
        # forces 8) would override this host's share of the mesh.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()

    def address(self) -> tuple[str, int, int]:
        """(this node's IP, a free port on it, this process's pid): where process 0 serves the coordinator."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1], os.getpid()

    def train(
        self, coordinator: str, config: Config, options: RunOptions, reporter: Any, fault: Fault | None
    ) -> dict:
        from mesh_transformer.platforms import skip_absent_tpu

        skip_absent_tpu()
        import jax

        from mesh_transformer import run, storage
        from mesh_transformer.config import check_device_count

        # Order matters: devices and collectives are configured before the backend starts (REFERENCE 8).
        jax.config.update("jax_num_cpu_devices", self.local_devices)  # only the CPU backend reads it
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator,
            num_processes=self.num_processes,
            process_id=self.process_id,
            coordinator_bind_address=coordinator,
        )
        check_device_count(config, jax.device_count())
        if jax.local_device_count() != self.local_devices:
            raise ClusterError(
                f"host {self.process_id} has {jax.local_device_count()} devices, expected "
                f"tpu_size / hosts = {self.local_devices}"
            )

        mine = fault if fault is not None and fault.host == self.process_id else None
        if mine is not None and mine.kind == "storage":
            storage.inject_write_failure(f"/step_{mine.step}/")

        def on_step(metrics: dict) -> None:
            reporter.report.remote(self.process_id, metrics)
            if mine is not None and mine.kind in ("die", "hang") and mine.step == metrics["step"]:
                if mine.kind == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(10**6)  # "hang": only the driver's step timeout ends this

        def on_phase(name: str) -> None:
            reporter.report.remote(self.process_id, {"phase": name})

        prompt = options.sample_prompt
        hooks = dict(progress=False, on_step=on_step, on_phase=on_phase, sample_prompt=None)
        metrics = run.train(config, dataclasses.replace(options, **hooks))
        if prompt is not None and self.process_id == 0:
            on_phase("sample")
            metrics = dict(metrics, sample=self._sample(config, options, prompt))
        return metrics

    @staticmethod
    def _sample(config: Config, options: RunOptions, prompt: str) -> str:
        """The run loop's own sample fetches params from every device, which here span hosts; process 0
        instead reads the final checkpoint's params onto its host CPU and samples there."""
        import jax

        from mesh_transformer import run
        from mesh_transformer.checkpoint import load_params
        from mesh_transformer.memory import abstract_params

        cpu = jax.local_devices(backend="cpu")[0]
        on_cpu = jax.sharding.SingleDeviceSharding(cpu)
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu), abstract_params(config)
        )
        params = load_params(options.model_dir, target)
        with jax.default_device(cpu):
            dataset_dir = next(iter(run.training_datasets(config, options)))  # the tokenizer's
            return run.sample_text(config, params, dataset_dir, prompt, options.sample_tokens)


# --------------------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------------------


def connect(address: str | None, hosts: int) -> None:
    """Join the Ray cluster at `address`, or start a local one listening on 127.0.0.1 only."""
    if address is None:
        # Ray 2.60 otherwise advertises the external address and listens on every interface (REFERENCE 8);
        # it reads this once, when first imported, and so do the processes it starts.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():  # the caller (a test, a notebook) chose the cluster already
        return
    if address is None:
        ray.init(
            address="local",  # a new instance, never one some other run on this machine started
            num_cpus=max(hosts, os.cpu_count() or 1),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="warning",
        )
        return
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ClusterError(f"--ray-address {address}: cannot join that Ray cluster ({e})") from None


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address where no Ray head listens: ray.init retries such an address for
    minutes, and waits forever on a port some other service holds (e.g. the dashboard's 8265)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(
            f"--ray-address {address!r}: expected HOST:PORT of a running Ray head "
            "(the address `ray start --head` prints, e.g. 10.0.0.2:6379) or 'auto'"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as s:
            if os.environ.get("RAY_USE_TLS", "0") in ("0", ""):
                # Ray's GCS is a gRPC server: to the HTTP/2 client preface it answers with a SETTINGS frame.
                s.sendall(_HTTP2_PREFACE)
                header = s.recv(9)
                if len(header) < 9 or header[3] != 0x4:
                    raise ClusterError(
                        f"--ray-address {address}: something listens there but it is not a Ray head "
                        "(no gRPC answer); pass the GCS address that `ray start --head` prints (port 6379 "
                        "by default)"
                    )
    except OSError as e:
        raise ClusterError(
            f"--ray-address {address}: no Ray head answers there ({e.strerror or e}); "
            "start one with `ray start --head` or pass its HOST:PORT"
        ) from None


class _Group:
    """One generation of actors: placed, started, joined into one mesh, and torn down as a unit."""

    def __init__(self, config: Config, cluster: ClusterOptions, spread: bool) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.hosts = cluster.hosts
        bundle = {"CPU": 1.0, **cluster.actor_resources}
        self.pg = placement_group([bundle] * self.hosts, strategy="STRICT_SPREAD" if spread else "PACK")
        self.actors: list[Any] = []
        self.refs: list[Any] = []
        self.where: list[str] = []  # "pid P on IP" of each host, for messages
        ready, _ = ray.wait([self.pg.ready()], timeout=cluster.placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise ClusterError(
                f"the Ray cluster could not place {self.hosts} actors "
                f"({'one per node' if spread else 'on any node'}, each needing {bundle}) within "
                f"{cluster.placement_timeout_s:.0f} s; it offers {ray.cluster_resources()}"
            )
        worker = ray.remote(max_restarts=0, max_concurrency=1)(HostWorker)
        for i in range(self.hosts):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
            self.actors.append(
                worker.options(
                    num_cpus=1, resources=dict(cluster.actor_resources), scheduling_strategy=strategy
                ).remote(i, self.hosts, config.tpu_size // self.hosts)
            )

    def start(
        self, config: Config, options: RunOptions, reporter: Any, fault: Fault | None, timeout: float
    ) -> str:
        import ray

        addresses = ray.get([a.address.remote() for a in self.actors], timeout=timeout)
        self.where = [f"pid {pid} on {ip}" for ip, _, pid in addresses]
        coordinator = f"{addresses[0][0]}:{addresses[0][1]}"
        self.refs = [a.train.remote(coordinator, config, options, reporter, fault) for a in self.actors]
        return coordinator

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.refs:  # the train calls end (with ActorDiedError) once their processes are gone
            ray.wait(self.refs, num_returns=len(self.refs), timeout=60)
        remove_placement_group(self.pg)


@dataclasses.dataclass
class _Outcome:
    metrics: dict | None = None  # set when every host finished
    reason: str = ""  # why the group failed
    last_step: int | None = None


def train(config: Config, options: RunOptions, cluster: ClusterOptions) -> dict:
    """Train on `cluster.hosts` Ray actors; returns the last step's metrics. Restarts the group on failure."""
    check_options(config, cluster)
    faults = Fault.parse(
        cluster.fault if cluster.fault is not None else os.environ.get(FAULT_ENV), cluster.hosts
    )
    connect(cluster.ray_address, cluster.hosts)
    with _bounded_interrupt(_INTERRUPT_GRACE_S):
        return _train(config, options, cluster, faults)


def _train(config: Config, options: RunOptions, cluster: ClusterOptions, faults: list[Fault]) -> dict:
    import ray
    from tqdm import tqdm

    from mesh_transformer.checkpoint import CheckpointManager
    from mesh_transformer.metrics import MetricsLog

    local = cluster.ray_address is None
    spread = not local and len([n for n in ray.nodes() if n["Alive"]]) > 1

    # Prepared once here so the hosts do not race to prepare it; each then reads only its own rows.
    actor_options = dataclasses.replace(options, data=training_data(config, options), on_step=None)
    checkpoints = CheckpointManager(options.model_dir)
    end_step = options.steps if options.steps is not None else config.total_steps
    reporter = ray.remote(num_cpus=0)(_Reporter).remote()
    bar = tqdm(total=end_step, disable=not options.progress, unit="step", dynamic_ncols=True)
    failures, attempt = 0, 0
    try:
        while True:
            resume_step = checkpoints.latest_step() or 0
            bar.n = resume_step
            bar.refresh()
            outcome = _run_group(
                config,
                actor_options,
                cluster,
                spread,
                reporter,
                faults[attempt] if attempt < len(faults) else None,
                bar,
                attempt == 0,
            )
            if outcome.metrics is not None:
                if "sample" in outcome.metrics:
                    bar.close()
                    print(outcome.metrics["sample"])
                return outcome.metrics
            attempt += 1
            committed = checkpoints.latest_step() or 0
            failures = 1 if committed > resume_step else failures + 1
            if failures > cluster.max_restarts:
                raise ClusterError(
                    f"training stopped after {failures} consecutive failed attempts without a new checkpoint "
                    f"(--max-restarts {cluster.max_restarts}); the last: {outcome.reason}"
                )
            backoff = min(cluster.backoff_s * 2 ** (failures - 1), cluster.max_backoff_s)
            event = dict(
                step=outcome.last_step,
                reason=outcome.reason,
                restarts=attempt,
                resume_step=committed,
                backoff_s=backoff,
            )
            log = MetricsLog(options.model_dir)  # written between groups, never beside actor 0's writer
            log.event("recovery", **event)
            log.close()
            bar.write(
                f"recovery {attempt}: {outcome.reason}; restarting {cluster.hosts} hosts from step "
                f"{committed} in {backoff:.0f} s",
                file=sys.stderr,
            )
            time.sleep(backoff)
    finally:
        bar.close()


@contextlib.contextmanager
def _bounded_interrupt(grace_s: float) -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual, so that the group is torn down and Ray shut down; but that
    teardown talks to Ray and was seen to block (about 1 run in 40 of the Ctrl-C test). So the first Ctrl-C
    also starts a timer: if the process still lives `grace_s` later, it kills everything it started (the
    local Ray included) and exits 130 as the graceful path would. Only in the main thread, where signals
    arrive."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def kill_everything() -> None:
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    def on_interrupt(signum: int, frame: Any) -> None:
        timer = threading.Timer(grace_s, kill_everything)
        timer.daemon = True
        timer.start()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C acts as it would have
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is on_interrupt:
            signal.signal(signal.SIGINT, previous)


def _run_group(
    config: Config,
    options: RunOptions,
    cluster: ClusterOptions,
    spread: bool,
    reporter: Any,
    fault: Fault | None,
    bar: Any,
    first: bool,
) -> _Outcome:
    """Start one group and watch it until it finishes or fails; the group is always torn down."""
    import ray

    outcome = _Outcome()
    group = None
    try:
        try:
            group = _Group(config, cluster, spread)
        except ClusterError as e:
            if first:
                raise  # the cluster never had room for this run: say so rather than wait again
            outcome.reason = str(e)  # hosts lost to a preemption may not be back yet
            return outcome
        ray.get(reporter.drain.remote())  # reports of an earlier group must not count as progress
        group.start(config, options, reporter, fault, cluster.startup_timeout_s)
        results: dict[int, dict] = {}
        watch = _Watch(cluster.step_timeout_s, cluster.startup_timeout_s)
        while len(results) < cluster.hosts:
            done, _ = ray.wait(
                [r for i, r in enumerate(group.refs) if i not in results], num_returns=1, timeout=_POLL_S
            )
            # news first, so that a failure below is reported with the latest step
            for process_id, metrics in ray.get(reporter.drain.remote(), timeout=60):
                watch.report(process_id, metrics, time.monotonic())
                if process_id == 0 and "step" in metrics:
                    outcome.last_step = metrics["step"]
                    bar.n = metrics["step"]
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_sec']:,.0f}")
            for ref in done:
                host = group.refs.index(ref)
                try:
                    results[host] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    outcome.reason = f"host {host} ({group.where[host]}) died: {_first_line(e)}"
                    return outcome
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, UserError):
                        raise e.cause from None  # the user's input is wrong: restarting cannot help
                    outcome.reason = f"host {host} ({group.where[host]}) failed: {_first_line(e.cause or e)}"
                    return outcome
            hung = watch.hung(time.monotonic())
            if hung:
                outcome.reason = hung
                return outcome
        outcome.metrics = results[0]
        return outcome
    except ray.exceptions.GetTimeoutError:
        outcome.reason = f"the actors did not start within {cluster.startup_timeout_s:.0f} s"
        return outcome
    except ray.exceptions.RayActorError as e:
        outcome.reason = f"an actor died while starting: {_first_line(e)}"
        return outcome
    finally:
        if group is not None:
            group.stop()


class _Watch:
    """Decides from the hosts' reports whether a group hangs. The step timeout times train steps only: until
    the first step (start-up, restore, compilation) and while any host evaluates, saves a checkpoint or
    samples, the start-up limit applies instead."""

    def __init__(self, step_timeout_s: float, startup_timeout_s: float) -> None:
        self.step_timeout_s, self.startup_timeout_s = step_timeout_s, startup_timeout_s
        self.last_report = time.monotonic()
        self.last_step: int | None = None
        self.busy: dict[int, str] = {}  # hosts doing something other than train steps, and what

    def report(self, process_id: int, metrics: dict, now: float) -> None:
        self.last_report = now
        if "phase" in metrics:
            self.busy.pop(process_id, None)
            if metrics["phase"] != "train":
                self.busy[process_id] = metrics["phase"]
        elif process_id == 0 or self.last_step is None:
            self.last_step = metrics["step"]

    def hung(self, now: float) -> str | None:
        """Why the group counts as hung at `now`, or None."""
        started = self.last_step is not None
        limit = self.step_timeout_s if started and not self.busy else self.startup_timeout_s
        if now - self.last_report <= limit:
            return None
        what = f"after step {self.last_step}" if started else "before the first step"
        if self.busy:
            what += " (" + ", ".join(f"host {h}: {p}" for h, p in sorted(self.busy.items())) + ")"
        return f"no step finished for {limit:.0f} s {what}: the group hung"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
