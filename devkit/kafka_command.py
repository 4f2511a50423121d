"""``python -m devkit kafka up|down|status|fetch``: the local single-node broker (devkit.localkafka)."""

from __future__ import annotations

import argparse
import json
import sys

from devkit.localkafka import LocalKafka, LocalKafkaError, ensure_jars


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kafka", help="start/stop a real local Apache Kafka broker (no Docker needed)")
    p.add_argument(
        "action",
        choices=["up", "down", "status", "fetch"],
        help="up: start (harmless when running); down: stop by PID; status; fetch: only download jars",
    )
    p.add_argument("--state-dir", help="data, logs and PID file (env LOCAL_KAFKA_DIR, default .run/kafka)")
    p.add_argument("--port", type=int, help="client port (env LOCAL_KAFKA_PORT, default 9092)")
    p.add_argument("--controller-port", type=int, help="KRaft controller port (default port+1)")
    p.add_argument(
        "--sasl-ssl-port",
        type=int,
        help="also a SASL_SSL listener (TLS, SCRAM-SHA-512) on this port, for trying the Kafka security settings "
        "(env LOCAL_KAFKA_SASL_SSL_PORT; needs a fresh state directory)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    broker = LocalKafka.from_env(args.state_dir, args.port, args.controller_port, args.sasl_ssl_port)
    try:
        if args.action == "up":
            print(broker.up())
            if broker.sasl_ssl_port is not None:
                print("local-kafka: a client of the SASL_SSL listener needs:", file=sys.stderr)
                for name, value in broker.client_env().items():
                    print(f"  {name}={value}", file=sys.stderr)
        elif args.action == "down":
            broker.down()
        elif args.action == "fetch":
            print(ensure_jars())
        else:
            print(json.dumps(broker.status(), indent=2))
    except LocalKafkaError as exc:
        print(f"python -m devkit kafka {args.action}: {exc}")
        return 1
    return 0
