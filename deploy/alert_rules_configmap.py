"""deploy/k8s/prometheus/alert-rules.yaml: the alert rules (deploy/prometheus-alerts.yml) as
a Kubernetes ConfigMap, generated from that file so the rules are written once.

    python -m deploy.alert_rules_configmap          # write it after editing the rules
    python -m deploy.alert_rules_configmap --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
RULES = DEPLOY / "prometheus-alerts.yml"
CONFIGMAP = DEPLOY / "k8s" / "prometheus" / "alert-rules.yaml"
#: the key (file name) the rules have in the ConfigMap, hence in its mount
RULES_KEY = "prometheus-alerts.yml"

_HEADER = f"""\
# GENERATED from deploy/prometheus-alerts.yml by `python -m deploy.alert_rules_configmap`;
# edit that file, not this one. Mount it where your Prometheus reads rule_files.
apiVersion: v1
kind: ConfigMap
metadata:
  name: medkms-prometheus-alerts
  namespace: medkms
  labels:
    app.kubernetes.io/component: monitoring
    app.kubernetes.io/part-of: medkms
data:
  {RULES_KEY}: |
"""


def render(rules: str) -> str:
    """The ConfigMap holding ``rules`` verbatim, as a YAML literal block."""
    if not rules.endswith("\n") or rules.endswith("\n\n"):
        # a literal block with clip chomping keeps exactly one final newline
        raise ValueError(f"{RULES} must end with exactly one newline")
    body = "".join(f"    {line}" if line.strip() else "\n" for line in rules.splitlines(True))
    return _HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check it is up to date")
    args = parser.parse_args(argv)
    wanted = render(RULES.read_text())
    if args.check:
        if not CONFIGMAP.exists() or CONFIGMAP.read_text() != wanted:
            print(f"{CONFIGMAP} is out of date: run python -m deploy.alert_rules_configmap")
            return 1
        return 0
    CONFIGMAP.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
