#!/usr/bin/env python3
"""Checks the monitoring profile without a Docker engine: docker-compose.yml, the Prometheus
scrape configuration and Grafana's provisioning parse, point at each other, and the Grafana
dashboard charts every metric of README.md's metric table (and no metric that is not there).
`make check-monitoring`; .ci/run runs it. Needs PyYAML (pip install PyYAML)."""

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def load_yaml(rel):
    with open(ROOT / rel) as f:
        return yaml.safe_load(f)


compose = load_yaml("docker-compose.yml")
services = compose["services"]
for name in ("prometheus", "grafana"):
    s = services.get(name)
    check(s is not None, f"docker-compose.yml: no service {name}")
    if s is None:
        continue
    check(s.get("profiles") == ["monitoring"], f"{name}: not in the monitoring profile only")
    check(":" in s.get("image", "") and not s["image"].endswith(":latest"), f"{name}: image not pinned")
    for v in s.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("./"):
            check((ROOT / src).exists(), f"{name}: mounts {src}, which does not exist")
        else:
            check(src in (compose.get("volumes") or {}), f"{name}: volume {src} not declared")
for name, s in services.items():
    if name not in ("prometheus", "grafana"):
        check("profiles" not in s, f"{name}: the databases must start without a profile")

prom = load_yaml("monitoring/prometheus.yml")
targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
for default in ("127.0.0.1:9187", "127.0.0.1:9188"):
    check(default in targets, f"prometheus.yml: does not scrape {default}")
listen = [a for a in services["prometheus"]["command"] if a.startswith("--web.listen-address=")]
check(listen == ["--web.listen-address=127.0.0.1:9090"], "prometheus: listens elsewhere than 127.0.0.1:9090")

ds = load_yaml("monitoring/grafana/provisioning/datasources/prometheus.yml")["datasources"]
check(len(ds) == 1 and ds[0]["type"] == "prometheus", "grafana: one Prometheus data source expected")
check(ds[0]["url"] == "http://127.0.0.1:9090", "grafana: the data source is not the profile's Prometheus")
providers = load_yaml("monitoring/grafana/provisioning/dashboards/cdc.yml")["providers"]
mounted = {v.split(":")[1] for v in services["grafana"]["volumes"]}
for p in providers:
    check(p["options"]["path"] in mounted, f"grafana: provider path {p['options']['path']} is not mounted")

dashboards = sorted((ROOT / "monitoring/grafana/dashboards").glob("*.json"))
check(dashboards, "no Grafana dashboard")
exprs = []
for d in dashboards:
    board = json.loads(d.read_text())
    ids = [p["id"] for p in board["panels"]]
    check(len(ids) == len(set(ids)), f"{d.name}: panel ids repeat")
    for p in board["panels"]:
        for t in p.get("targets", []):
            check(t.get("datasource", {}).get("uid") == ds[0]["uid"], f"{d.name}: panel {p['title']!r} uses another data source")
            check(t.get("expr"), f"{d.name}: panel {p['title']!r} has a target without a query")
            exprs.append(t.get("expr", ""))

readme = (ROOT / "README.md").read_text()
# The metric table of "Metrics and health endpoints" (other tables name columns like cdc_*).
readme = readme.split("## Metrics and health endpoints", 1)[-1].split("\n## ", 1)[0]
documented = set(re.findall(r"^\| `(cdc_[a-z_]+)(?:\{[^`]*\})?` \|", readme, re.M))
check(len(documented) >= 20, f"README.md: metric table not found ({len(documented)} metrics)")
used = set()
for e in exprs:
    for name in re.findall(r"\bcdc_[a-z_]+", e):
        # A histogram's series (_bucket, _sum, _count) chart its family.
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        used.add(family if family in documented else name)
check(not documented - used, f"metrics not charted by the Grafana dashboard: {sorted(documented - used)}")
check(not used - documented, f"metrics charted but not in README's table: {sorted(used - documented)}")

if failures:
    for f in failures:
        print("check-monitoring:", f, file=sys.stderr)
    sys.exit(1)
print(f"check-monitoring: ok ({len(dashboards)} dashboard(s), {len(exprs)} queries, {len(documented)} metrics charted)")
