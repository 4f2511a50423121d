"""A real single-node Apache Kafka broker (KRaft, broker+controller) without Docker.

1. The broker jars (``org.apache.kafka:kafka_2.13`` and its runtime dependencies, plus a log4j2
   backend) are copied from Maven Central with Maven into a cache outside the repository
   (``$PIPELINE_CACHE_DIR``, default ``~/.cache/ctk-kustomer-pipeline``), once, and reused.
2. ``up`` writes ``server.properties`` for 127.0.0.1, formats the KRaft storage on first use,
   starts ``kafka.Kafka`` detached, records its PID and waits until it answers a metadata request.
   Starting a broker that is already up is harmless.
3. ``down`` sends SIGTERM to the recorded PID (the broker's shutdown hook runs), waits, and
   falls back to SIGKILL; ``kill`` sends SIGKILL at once (a crash, for tests). ``up`` after
   either starts the same broker again: same ports, same data.

Ports: 9092 for clients and the next one for the KRaft controller, unless ``LOCAL_KAFKA_PORT`` /
``LOCAL_KAFKA_CONTROLLER_PORT`` (or ``--port``) say otherwise. When a default port is taken by
another process, ``up`` picks a free one and says which; a port chosen explicitly that is taken
stops it with one line naming the port and the variable. A running broker is found where its
``server.properties`` says it listens, whatever the environment says now.

:func:`broker_for_run` is what the demo and ``python -m devkit up`` share: ``KAFKA_BOOTSTRAP``
when set, else the local broker (started, or reused when it already runs).

State lives in one directory (default ``.run/kafka`` under the current directory): ``data/``,
``logs/server.log`` (the broker log a person reads), ``broker.pid``, ``server.properties``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devkit.errors import DevkitError
from devkit.net import choose_port, free_port
from devkit.stack import pid_alive, shown, stop_pids

KAFKA_VERSION = "4.1.1"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
REPO_ROOT = Path(__file__).resolve().parent.parent
POM = REPO_ROOT / "deploy" / "local-kafka" / "pom.xml"


class LocalKafkaError(DevkitError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("PIPELINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ctk-kustomer-pipeline"
    )
    return Path(base)


def lib_dir() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}" / "lib"


def ensure_jars(quiet: bool = False) -> Path:
    """Copy the broker's jars into the cache once; later calls return at once."""
    target = lib_dir()
    marker = target / ".complete"
    if marker.exists():
        return target
    if shutil.which("mvn") is None:
        raise LocalKafkaError("Maven (mvn) is not installed; it is needed once to fetch the Kafka jars")
    if shutil.which("java") is None:
        raise LocalKafkaError("Java 17 (java) is not installed; the broker needs it")
    staging = target.parent / f"lib.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = ["mvn", "-B", "-f", str(POM), DEPENDENCY_PLUGIN, "-DincludeScope=runtime", f"-DoutputDirectory={staging}"]
    if quiet:
        cmd.insert(1, "-q")
    print(
        f"local-kafka: fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {target}",
        file=sys.stderr,
        flush=True,
    )
    result = subprocess.run(cmd, cwd=str(POM.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise LocalKafkaError(
            f"Maven could not fetch the Kafka jars (exit {result.returncode}):\n{result.stdout[-3000:]}"
        )
    jars = list(staging.glob("*.jar"))
    if not any(j.name.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
        raise LocalKafkaError(f"Maven finished but kafka_2.13-{KAFKA_VERSION}.jar is missing in {staging}")
    (staging / ".complete").write_text(f"{len(jars)} jars\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


@dataclass
class LocalKafka:
    state_dir: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    port_given: bool = False  # the ports were chosen (argument or environment), not defaults
    controller_port_given: bool = False

    @classmethod
    def from_env(
        cls, state_dir: str | None = None, port: int | None = None, controller_port: int | None = None
    ) -> LocalKafka:
        sd = Path(state_dir or os.environ.get("LOCAL_KAFKA_DIR") or ".run/kafka").resolve()
        p = port or _env_port("LOCAL_KAFKA_PORT") or 9092
        cp = controller_port or _env_port("LOCAL_KAFKA_CONTROLLER_PORT") or p + 1
        return cls(
            state_dir=sd,
            port=p,
            controller_port=cp,
            heap=os.environ.get("LOCAL_KAFKA_HEAP", "512m"),
            port_given=bool(port or _env_port("LOCAL_KAFKA_PORT")),
            controller_port_given=bool(controller_port or _env_port("LOCAL_KAFKA_CONTROLLER_PORT")),
        )

    @classmethod
    def ephemeral(cls, state_dir: Path) -> LocalKafka:
        """A broker on free ports (test sessions)."""
        return cls(
            state_dir=state_dir,
            port=free_port(),
            controller_port=free_port(),
            port_given=True,
            controller_port_given=True,
        )

    # -- paths ---------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "broker.pid"

    @property
    def properties_file(self) -> Path:
        return self.state_dir / "server.properties"

    # -- state ---------------------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def _adopt_recorded_ports(self) -> None:
        """A running broker listens where its ``server.properties`` says, whatever this process was told."""
        try:
            text = self.properties_file.read_text()
        except OSError:
            return
        for line in text.splitlines():
            if not line.startswith("listeners="):
                continue
            for listener in line.split("=", 1)[1].split(","):
                name, _, address = listener.partition("://")
                port = int(address.rsplit(":", 1)[1])
                if name == "PLAINTEXT":
                    self.port = port
                elif name == "CONTROLLER":
                    self.controller_port = port

    def _choose_ports(self, say: Callable[[str], None]) -> None:
        """Free ports for a broker about to start: a taken default is replaced (and said), a taken
        chosen port stops with one line (:class:`DevkitError`)."""
        what = "the local Kafka broker"
        self.port = choose_port("LOCAL_KAFKA_PORT", self.port, what, say, given=self.port if self.port_given else None)
        self.controller_port = choose_port(
            "LOCAL_KAFKA_CONTROLLER_PORT",
            self.controller_port,
            f"{what}'s controller",
            say,
            given=self.controller_port if self.controller_port_given else None,
        )

    def port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    # -- files ---------------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # One node: internal topics must accept a replication factor of 1, or groups and
            # transactions never become available.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "transaction.max.timeout.ms": "900000",
            "group.max.session.timeout.ms": "600000",
        }
        self.properties_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.state_dir / "log4j2.properties").write_text(
            "status = warn\n"
            "appender.file.type = File\n"
            "appender.file.name = FILE\n"
            f"appender.file.fileName = {self.log_file}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
            "logger.kafka.name = kafka\nlogger.kafka.level = INFO\n"
            "logger.state.name = state.change.logger\nlogger.state.level = WARN\n"
        )

    def _java(self, main: str, *args: str, jvm: list[str] | None = None) -> list[str]:
        return ["java", *(jvm or []), "-cp", f"{lib_dir()}/*", main, *args]

    def _format(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: a leading '-' reads as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.properties_file),
            jvm=["-Xmx256m", f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}"],
        )
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise LocalKafkaError(f"formatting KRaft storage failed:\n{result.stdout[-2000:]}")

    # -- lifecycle -----------------------------------------------------------------------------
    def up(self, timeout_s: float = 90.0, quiet: bool = False, say: Callable[[str], None] | None = None) -> str:
        """Start the broker unless it runs; return the bootstrap address once it answers.
        ``say`` hears about ports chosen instead of taken defaults (even when ``quiet``)."""
        say = say or (lambda text: print(f"local-kafka: {text}", file=sys.stderr))
        pid = self.pid()
        if pid is not None:
            self._adopt_recorded_ports()
            asyncio.run(wait_for_metadata(self.bootstrap, timeout_s))
            if not quiet:
                print(f"local-kafka: already running (pid {pid}) at {self.bootstrap}", file=sys.stderr)
            return self.bootstrap
        self._choose_ports(say)
        ensure_jars(quiet=quiet)
        self._write_config()
        self._format()
        # A development broker lives for minutes on a small shared machine: C1 only (C2's compile
        # work costs more CPU than it saves in such runs — half the broker's CPU per call in the
        # end-to-end benchmark) and the serial collector (one small heap, no concurrent GC threads
        # competing with the services). LOCAL_KAFKA_JVM_FLAGS replaces these two choices.
        tuning = os.environ.get("LOCAL_KAFKA_JVM_FLAGS", "-XX:+UseSerialGC -XX:TieredStopAtLevel=1").split()
        jvm = [
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-server",
            *tuning,
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.log_dir}",
            f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}",
        ]
        out = open(self.log_dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            self._java("kafka.Kafka", str(self.properties_file), jvm=jvm),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.pid_file.write_text(f"{proc.pid}\n")
        try:
            asyncio.run(wait_for_metadata(self.bootstrap, timeout_s, proc=proc))
        except Exception:
            self.down(quiet=True)
            raise LocalKafkaError(f"broker did not come up; see {self.log_file}") from None
        if not quiet:
            print(f"local-kafka: up (pid {proc.pid}) at {self.bootstrap}; log {self.log_file}", file=sys.stderr)
        return self.bootstrap

    def down(self, timeout_s: float = 30.0, quiet: bool = False) -> bool:
        """Stop the broker by its PID; True when one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            if not quiet:
                print("local-kafka: not running", file=sys.stderr)
            return False
        stop_pids([("broker", pid, None)], timeout_s)
        self.pid_file.unlink(missing_ok=True)
        if not quiet:
            print(f"local-kafka: stopped (pid {pid})", file=sys.stderr)
        return True

    def kill(self, timeout_s: float = 30.0) -> bool:
        """SIGKILL the broker (no shutdown hook, no clean close of its logs), as a crash would; True
        when one was running. ``up`` starts it again on the same ports and data."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        # the JVM's main thread shows as a zombie before its other threads let go of the ports
        while (self.pid() is not None or self.port_open()) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> dict[str, object]:
        pid = self.pid()
        if pid is not None:
            self._adopt_recorded_ports()
        return {
            "running": pid is not None,
            "pid": pid,
            "bootstrap": self.bootstrap,
            "state_dir": str(self.state_dir),
            "log": str(self.log_file),
        }


def _env_port(var: str) -> int | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise LocalKafkaError(f"{var}={raw!r}: expected a port number") from None


@dataclass
class RunBroker:
    """The Kafka broker a run (the demo, ``python -m devkit up``) uses."""

    bootstrap: str
    local: LocalKafka | None  # the local broker; None when KAFKA_BOOTSTRAP named one
    started: bool  # this run started it, so it is this run's to stop

    def describe(self) -> str:
        if self.local is None:
            return f"Kafka at {self.bootstrap} (KAFKA_BOOTSTRAP)"
        how = "started" if self.started else "already running, left running"
        return f"local Kafka broker at {self.bootstrap} ({how}; log {shown(self.local.log_file)})"


def broker_for_run(say: Callable[[str], None], timeout_s: float = 120.0) -> RunBroker:
    """``KAFKA_BOOTSTRAP`` when set (it must answer), else the local broker: reused when it runs,
    started otherwise (on free ports when the defaults are taken, said through ``say``)."""
    given = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if given:
        try:
            asyncio.run(wait_for_metadata(given, 20.0))
        except LocalKafkaError:
            raise LocalKafkaError(
                f"KAFKA_BOOTSTRAP={given}: no Kafka broker answers there; start it, or unset KAFKA_BOOTSTRAP "
                "to use the local broker"
            ) from None
        return RunBroker(given, None, False)
    broker = LocalKafka.from_env()
    started = broker.pid() is None
    bootstrap = broker.up(timeout_s, quiet=True, say=say)
    return RunBroker(bootstrap, broker, started)


async def wait_for_metadata(bootstrap: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll until the broker answers a real metadata request (the port alone opens too early)."""
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    host, _, port = bootstrap.rpartition(":")
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LocalKafkaError(f"broker process exited with {proc.returncode}")
        with socket.socket() as s:  # the port first, quietly; then a real metadata request
            s.settimeout(0.5)
            if s.connect_ex((host or "127.0.0.1", int(port))) != 0:
                await asyncio.sleep(0.3)
                continue
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            if cluster.get("brokers"):
                return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        finally:
            try:
                await admin.close()
            except Exception:  # noqa: BLE001
                pass
        await asyncio.sleep(0.5)
    raise LocalKafkaError(f"broker at {bootstrap} did not answer metadata within {timeout_s}s: {last}")
