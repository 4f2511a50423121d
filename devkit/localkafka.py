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
``LOCAL_KAFKA_CONTROLLER_PORT`` (or ``--port``) say otherwise. ``LOCAL_KAFKA_SASL_SSL_PORT`` (or
``--sasl-ssl-port``; ``LocalKafka.ephemeral(..., sasl_ssl=True)`` in tests) adds a listener as a
secured cluster has one: TLS with a certificate for 127.0.0.1/localhost signed by a CA made here
(``tls/ca.pem``), SCRAM-SHA-512 login of the user ``pipeline`` whose password is generated into
``secrets/`` and created at format time (``kafka-storage format --add-scram``).
:meth:`LocalKafka.client_env` is what a client needs to use it. The controller and the other
brokers' traffic stay PLAINTEXT on their own ports. When a default port is taken by
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
import hashlib
import os
import secrets
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
from devkit.tls import make_ca, make_server_cert
from pipeline.core.settings import KafkaSecurity, SettingsError

KAFKA_VERSION = "4.1.1"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
REPO_ROOT = Path(__file__).resolve().parent.parent
POM = REPO_ROOT / "deploy" / "local-kafka" / "pom.xml"
SCRAM_USER = "pipeline"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 4096


class LocalKafkaError(DevkitError):
    pass


class BrokerRefused(LocalKafkaError):
    """The broker answers but refuses the connection settings (login, certificate)."""


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
    sasl_ssl_port: int | None = None  # also a SASL_SSL listener (TLS + SCRAM-SHA-512) on this port
    # free ports picked for a test session: another process may bind one before the broker does,
    # then the start is tried again on other free ports (a fresh state directory)
    ephemeral_ports: bool = False

    @classmethod
    def from_env(
        cls,
        state_dir: str | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        sasl_ssl_port: int | None = None,
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
            # 0: any free port
            sasl_ssl_port=sasl_ssl_port if sasl_ssl_port is not None else _env_port("LOCAL_KAFKA_SASL_SSL_PORT"),
        )

    @classmethod
    def ephemeral(cls, state_dir: Path, sasl_ssl: bool = False) -> LocalKafka:
        """A broker on free ports (test sessions); ``sasl_ssl`` adds the SASL_SSL listener."""
        return cls(
            state_dir=state_dir,
            port=free_port(),
            controller_port=free_port(),
            port_given=True,
            controller_port_given=True,
            sasl_ssl_port=free_port() if sasl_ssl else None,
            ephemeral_ports=True,
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

    # -- the SASL_SSL listener ------------------------------------------------------------------
    @property
    def sasl_ssl_bootstrap(self) -> str:
        if self.sasl_ssl_port is None:
            raise LocalKafkaError("this broker has no SASL_SSL listener (LOCAL_KAFKA_SASL_SSL_PORT)")
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA that signed the broker's certificate: what a client trusts (KAFKA_SSL_CA_FILE)."""
        return self.tls_dir / "ca.pem"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def sasl_username_file(self) -> Path:
        return self.secrets_dir / "kafka-sasl-username"

    @property
    def sasl_password_file(self) -> Path:
        return self.secrets_dir / "kafka-sasl-password"

    def client_env(self) -> dict[str, str]:
        """The settings of a pipeline client of the SASL_SSL listener (README "Kafka security")."""
        return {
            "KAFKA_BOOTSTRAP": self.sasl_ssl_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": SCRAM_MECHANISM,
            "KAFKA_SASL_USERNAME_FILE": str(self.sasl_username_file),
            "KAFKA_SASL_PASSWORD_FILE": str(self.sasl_password_file),
            "KAFKA_SSL_CA_FILE": str(self.ca_file),
        }

    def _secret(self, path: Path, make: Callable[[], str]) -> str:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(make() + "\n")
        return path.read_text().strip()

    def _sasl_ssl_properties(self) -> dict[str, str]:
        """The listener's TLS material (made once) and its settings."""
        password = self._secret(self.tls_dir / "keystore-password", lambda: secrets.token_hex(16))
        ca = make_ca(self.tls_dir)
        server = make_server_cert(self.tls_dir, ca, password)
        prefix = "listener.name.sasl_ssl."
        return {
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"{prefix}{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            f"{prefix}ssl.keystore.type": "PKCS12",
            f"{prefix}ssl.keystore.location": str(server.keystore),
            f"{prefix}ssl.keystore.password": password,
            f"{prefix}ssl.key.password": password,
            f"{prefix}ssl.client.auth": "none",
        }

    def _scram_credential(self) -> str:
        """``--add-scram`` for the user: salted, so the password is never on a command line."""
        self._secret(self.sasl_username_file, lambda: SCRAM_USER)
        password = self._secret(self.sasl_password_file, lambda: secrets.token_hex(16))
        salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
        salt_b64, salted_b64 = base64.b64encode(salt).decode(), base64.b64encode(salted).decode()
        return (
            f"{SCRAM_MECHANISM}=[name={SCRAM_USER},iterations={SCRAM_ITERATIONS},"
            f'salt="{salt_b64}",saltedpassword="{salted_b64}"]'
        )

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
                elif name == "SASL_SSL":
                    self.sasl_ssl_port = port

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
        if self.sasl_ssl_port is not None:
            self.sasl_ssl_port = choose_port(
                "LOCAL_KAFKA_SASL_SSL_PORT",
                self.sasl_ssl_port,
                f"{what}'s SASL_SSL listener",
                say,
                given=self.sasl_ssl_port,
            )

    def port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    # -- files ---------------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        listeners = f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        advertised = f"PLAINTEXT://127.0.0.1:{self.port}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        if self.sasl_ssl_port is not None:
            listeners += f",SASL_SSL://127.0.0.1:{self.sasl_ssl_port}"
            advertised += f",SASL_SSL://127.0.0.1:{self.sasl_ssl_port}"
            protocols += ",SASL_SSL:SASL_SSL"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": protocols,
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
        if self.sasl_ssl_port is not None:
            props.update(self._sasl_ssl_properties())
        self.properties_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        if self.sasl_ssl_port is not None:
            self.properties_file.chmod(0o600)  # it holds the keystore's password
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
        scram_marker = self.data_dir / ".scram-user"
        if (self.data_dir / "meta.properties").exists():
            if self.sasl_ssl_port is not None and not scram_marker.exists():
                raise LocalKafkaError(
                    f"{self.data_dir} was formatted without the SASL_SSL listener's user (it is created at format "
                    "time); use a fresh state directory (LOCAL_KAFKA_DIR) for a broker with LOCAL_KAFKA_SASL_SSL_PORT"
                )
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
            *(["--add-scram", self._scram_credential()] if self.sasl_ssl_port is not None else []),
            jvm=["-Xmx256m", f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}"],
        )
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise LocalKafkaError(f"formatting KRaft storage failed:\n{result.stdout[-2000:]}")
        if self.sasl_ssl_port is not None:
            scram_marker.write_text(f"{SCRAM_USER} {SCRAM_MECHANISM}\n")

    # -- lifecycle -----------------------------------------------------------------------------
    def up(self, timeout_s: float = 90.0, quiet: bool = False, say: Callable[[str], None] | None = None) -> str:
        """Start the broker unless it runs; return the bootstrap address once it answers.
        ``say`` hears about ports chosen instead of taken defaults (even when ``quiet``)."""
        say = say or (lambda text: print(f"local-kafka: {text}", file=sys.stderr))
        pid = self.pid()
        if pid is not None:
            self._adopt_recorded_ports()
            asyncio.run(wait_for_metadata(self.bootstrap, timeout_s, security=PLAINTEXT))
            if not quiet:
                print(f"local-kafka: already running (pid {pid}) at {self.bootstrap}", file=sys.stderr)
            return self.bootstrap
        self._choose_ports(say)
        ensure_jars(quiet=quiet)
        # a first start on free ports may lose one to another process; a restart keeps its ports
        fresh = self.ephemeral_ports and not (self.data_dir / "meta.properties").exists()
        for attempt in range(1, 4):
            try:
                return self._start(timeout_s, quiet)
            except LocalKafkaError:
                if not (fresh and attempt < 3 and self._lost_a_port()):
                    raise
            self.log_file.rename(self.log_file.with_name(f"server.log.port-taken-{attempt}"))
            self.port, self.controller_port = free_port(), free_port()
            if self.sasl_ssl_port is not None:
                self.sasl_ssl_port = free_port()
            shutil.rmtree(self.data_dir, ignore_errors=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lost_a_port(self) -> bool:
        """The last start failed because another process had bound one of its ports meanwhile."""
        try:
            return "Address already in use" in self.log_file.read_text(errors="replace")[-200_000:]
        except OSError:
            return False

    def _start(self, timeout_s: float, quiet: bool) -> str:
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
            asyncio.run(wait_for_metadata(self.bootstrap, timeout_s, proc=proc, security=PLAINTEXT))
            if self.sasl_ssl_port is not None:  # TLS and the user's login work before anyone relies on them
                asyncio.run(
                    wait_for_metadata(self.sasl_ssl_bootstrap, 30.0, proc=proc, security=self.client_security())
                )
        except Exception as exc:
            self.down(quiet=True)
            raise LocalKafkaError(f"broker did not come up ({exc}); see {self.log_file}") from None
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
        status: dict[str, object] = {
            "running": pid is not None,
            "pid": pid,
            "bootstrap": self.bootstrap,
            "state_dir": str(self.state_dir),
            "log": str(self.log_file),
        }
        if self.sasl_ssl_port is not None:
            status["sasl_ssl"] = self.client_env()
        return status

    def client_security(self) -> KafkaSecurity:
        """:meth:`client_env` read as the pipeline reads it."""
        return KafkaSecurity.from_env(self.client_env())


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
        except BrokerRefused as exc:
            raise LocalKafkaError(f"KAFKA_BOOTSTRAP={given}: {exc}") from None
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


PLAINTEXT = KafkaSecurity()  # the local broker's own listener, whatever the environment says


async def wait_for_metadata(
    bootstrap: str,
    timeout_s: float = 60.0,
    proc: subprocess.Popen | None = None,
    security: KafkaSecurity | None = None,
) -> None:
    """Poll until the broker answers a real metadata request (the port alone opens too early).
    ``security``: the connection settings (default: the pipeline's, from the environment); a
    broker that refuses them (login, certificate) ends the wait at once."""
    from pipeline.kafka.clients import new_admin

    try:
        security = KafkaSecurity.from_env() if security is None else security
    except SettingsError as exc:
        raise BrokerRefused(str(exc)) from None

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
        admin = new_admin(bootstrap_servers=bootstrap, request_timeout_ms=3000, security=security)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            if cluster.get("brokers"):
                return
        except SettingsError as exc:  # KafkaSecurityError: waiting will not help
            raise BrokerRefused(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        finally:
            try:
                await admin.close()
            except Exception:  # noqa: BLE001
                pass
        await asyncio.sleep(0.5)
    raise LocalKafkaError(f"broker at {bootstrap} did not answer metadata within {timeout_s}s: {last}")
