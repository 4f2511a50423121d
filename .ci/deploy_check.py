"""Helpers of .ci/check-deploy (run with the tools' Python: PyYAML, jsonschema, kubernetes-validate).

validate K8S_VERSION FILE...   every object of the rendered manifests against its schema: the
                               vendored CRD schemas (deploy/k8s/schemas/<kind>-<group>-<version>.json)
                               for custom resources, kubernetes-validate's bundled schemas (strict:
                               unknown fields refused) for the rest. A kind with no schema fails.
prometheusrule [--write]       deploy/k8s/base/prometheusrule.yaml must be deploy/prometheus/rules.yml
                               wrapped in a PrometheusRule; --write (re)generates it.
dashboard-rules OUT            every PromQL expression of the Grafana dashboards as a rule file, for
                               `promtool check rules` (Grafana's interval variables become 5m).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "deploy" / "k8s" / "schemas"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS_RULE = REPO / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"


def schema_file(obj: dict) -> Path:
    group, _, version = obj["apiVersion"].rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return SCHEMAS / f"{obj['kind'].lower()}{suffix}.json"


def validate(version: str, files: list[str]) -> int:
    import kubernetes_validate

    failures = checked = 0
    for name in files:
        for obj in yaml.safe_load_all(Path(name).read_text()):
            if not obj:
                continue
            checked += 1
            what = f"{name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            custom = schema_file(obj)
            if custom.exists():
                schema = json.loads(custom.read_text())
                errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
                for e in errors:
                    print(f"ERROR {what}: {'.'.join(map(str, e.path))}: {e.message}")
                failures += bool(errors)
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                print(f"ERROR {what}: {'.'.join(map(str, e.path))}: {e.message}")
                failures += 1
            except kubernetes_validate.SchemaNotFoundError as e:
                print(f"ERROR {what}: no schema ({e.message}; a custom resource needs {custom.relative_to(REPO)})")
                failures += 1
    print(f"{checked - failures} of {checked} objects valid (Kubernetes {version})")
    return 1 if failures or not checked else 0


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule_text() -> str:
    rules = yaml.safe_load(RULES.read_text())
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "ctk-kustomer-pipeline"},
        "spec": {"groups": rules["groups"]},
    }
    head = (
        "# Generated from deploy/prometheus/rules.yml by `.ci/check-deploy --write`: edit that file, then\n"
        "# regenerate this one (.ci/check-deploy fails while they differ).\n"
    )
    return head + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def prometheusrule(write: bool) -> int:
    want = prometheus_rule_text()
    if write:
        PROMETHEUS_RULE.write_text(want)
        print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}")
        return 0
    have = PROMETHEUS_RULE.read_text() if PROMETHEUS_RULE.exists() else ""
    if yaml.safe_load(have or "{}") != yaml.safe_load(want):  # the same rules, however PyYAML lays them out
        print(f"{PROMETHEUS_RULE.relative_to(REPO)} is not deploy/prometheus/rules.yml: run .ci/check-deploy --write")
        return 1
    print(f"{PROMETHEUS_RULE.relative_to(REPO)} matches deploy/prometheus/rules.yml")
    return 0


_GRAFANA_INTERVAL = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, rows' panels included."""
    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def dashboard_rules(out: str) -> int:
    rules = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for i, (_where, expr) in enumerate(dashboard_expressions(json.loads(path.read_text()))):
            record = f"dashboard:{path.stem.replace('-', '_')}:expr{i}"
            rules.append({"record": record, "expr": _GRAFANA_INTERVAL.sub("5m", expr)})
    Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
    print(f"{len(rules)} dashboard expressions")
    return 0 if rules else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["validate"] and len(argv) >= 3:
        return validate(argv[1], argv[2:])
    if argv[:1] == ["prometheusrule"]:
        return prometheusrule("--write" in argv[1:])
    if argv[:1] == ["dashboard-rules"] and len(argv) == 2:
        return dashboard_rules(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
