#!/usr/bin/env python3
"""Checks and generators for the Helm chart (charts/appconn-operator) and deploy/.

    python3 .ci/chart.py check          lint, render every case, reject bad values, compare
                                        deploy/ and the chart's CRDs with their sources
    python3 .ci/chart.py render-deploy  rewrite deploy/ from the chart (default values)
    python3 .ci/chart.py sync-crds      rewrite the chart's CRD templates from crds/

Needs the helm-python-sdk package from PyPI (`pip install helm-python-sdk`): Helm's own Go code as
a library, so lint, schema validation and rendering are exactly Helm's, with no helm binary.

`check` leaves each case's rendered documents in target/chart-render/<case>/, where
`cargo test --test manifests -- --ignored` parses them as their Kubernetes types.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

try:
    import helm_python as helm
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("chart.py needs helm-python-sdk: pip install helm-python-sdk")

ROOT = Path(__file__).resolve().parent.parent
CHART_NAME = "appconn-operator"

# deploy/ is the chart rendered as this release; the check cases use the same names so the
# generated manifests and the checked ones describe the same objects.
RELEASE = "appconn"
NAMESPACE = "appconn-system"

# Rendered by `check`, one directory each under target/chart-render/. Each case switches on one
# feature whose templates would otherwise never be rendered, linted or type-checked.
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "persistence-off": {"persistence": {"enabled": False}},
    "existing-claim": {"persistence": {"existingClaim": "appconn-store-restored"}},
    "replicas-2": {
        "replicaCount": 2,
        "store": {
            "postgres": {
                "enabled": True,
                "urlSecret": {"name": "appconn-postgres"},
                "passwordSecret": {"name": "appconn-postgres-password"},
            }
        },
    },
    "store-api-cert-manager": {
        "storeApi": {"tls": {"certManager": {"enabled": True, "issuerRef": {"kind": "ClusterIssuer", "name": "internal-ca"}}}}
    },
    "store-api-plain-http": {"storeApi": {"tls": {"enabled": False}}},
    "service-monitor": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "scrapeTimeout": "10s"}
    },
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "storeApiFrom": [{"namespaceSelector": {"matchLabels": {"appconn.io/consumer": "true"}}}],
        }
    },
}

# Values that must be refused by values.schema.json, with the text the error must contain so
# a failure for another reason (a template bug, say) does not pass for a schema error.
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("typo'd top-level key", {"replicaCont": 2}, "'replicaCont' not allowed"),
    ("typo'd nested key", {"persistence": {"sise": "2Gi"}}, "'sise' not allowed"),
    ("replicaCount as a string", {"replicaCount": "2"}, "/replicaCount"),
    ("negative port", {"ports": {"admin": -1}}, "/ports/admin"),
    ("unknown log format", {"logging": {"format": "xml"}}, "/logging/format"),
    ("watched namespace listed twice", {"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
]

# Values the schema cannot judge alone, refused by the templates themselves.
BAD_COMBINATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("admin and store API on one port", {"ports": {"admin": 9000, "storeApi": 9000}}, "must differ"),
    ("two replicas on SQLite", {"replicaCount": 2}, "replicaCount > 1 needs store.postgres.enabled=true"),
    (
        "PostgreSQL without its URL Secret",
        {"store": {"postgres": {"enabled": True}}},
        "needs store.postgres.urlSecret.name",
    ),
    (
        "cert-manager without an issuer",
        {"storeApi": {"tls": {"certManager": {"enabled": True}}}},
        "needs storeApi.tls.certManager.issuerRef.name",
    ),
    (
        "no ServiceAccount created and none named",
        {"serviceAccount": {"create": False}},
        "serviceAccount.name is required",
    ),
]

GENERATED_HEADER = (
    "# Generated from charts/appconn-operator by `python3 .ci/chart.py render-deploy`.\n"
    "# Do not edit: change the chart and run it again (CI fails when this file is stale).\n"
)

CRD_TEMPLATE_HEADER = (
    "{{- /* Generated from crds/%s by `python3 .ci/chart.py sync-crds`: do not edit. */ -}}\n"
)
KEEP_NEW_BLOCK = (
    "  {{- if .Values.crds.keep }}\n"
    "  annotations:\n"
    "    helm.sh/resource-policy: keep\n"
    "  {{- end }}\n"
)
KEEP_IN_EXISTING_BLOCK = (
    "    {{- if .Values.crds.keep }}\n"
    "    helm.sh/resource-policy: keep\n"
    "    {{- end }}\n"
)
KEEP_ANNOTATION = "helm.sh/resource-policy"


class Paths:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.chart = root / "charts" / CHART_NAME
        self.crds = root / "crds"
        self.chart_crds = self.chart / "templates" / "crds"
        self.deploy = root / "deploy"
        self.render_out = root / "target" / "chart-render"


# ---------------------------------------------------------------------------------------------
# CRDs


def crd_template(name: str, text: str) -> str:
    """The chart template for one generated CRD file: its text verbatim, except that template
    delimiters are escaped (Helm would otherwise evaluate them) and metadata gains the
    switchable helm.sh/resource-policy annotation."""
    escaped = re.sub(r"\{\{|\}\}", lambda m: '{{ "%s" }}' % m.group(0), text)
    lines = escaped.splitlines(keepends=True)
    out: list[str] = []
    metadata_blocks = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if line.rstrip("\r\n") != "metadata:":
            continue
        metadata_blocks += 1
        end = i
        while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
            end += 1
        existing = [j for j in range(i, end) if lines[j].startswith("  annotations:")]
        if not existing:
            out.append(KEEP_NEW_BLOCK)
            continue
        j = existing[0]
        if lines[j].rstrip("\r\n") != "  annotations:":
            raise SystemExit(f"crds/{name}: metadata.annotations is not a block mapping; cannot add the keep annotation")
        out.extend(lines[i : j + 1])
        out.append(KEEP_IN_EXISTING_BLOCK)
        i = j + 1
    if metadata_blocks != 1:
        raise SystemExit(f"crds/{name}: expected one top-level `metadata:` block, found {metadata_blocks}")
    body = "".join(out)
    if not body.endswith("\n"):
        body += "\n"
    return (CRD_TEMPLATE_HEADER % name) + "{{- if .Values.crds.install }}\n" + body + "{{- end }}\n"


def source_crds(paths: Paths) -> dict[str, str]:
    if not paths.crds.is_dir():
        return {}
    return {p.name: p.read_text() for p in sorted(paths.crds.glob("*.yaml"))}


def sync_crds(paths: Paths) -> None:
    wanted = {name: crd_template(name, text) for name, text in source_crds(paths).items()}
    paths.chart_crds.mkdir(parents=True, exist_ok=True)
    for stale in paths.chart_crds.glob("*.yaml"):
        if stale.name not in wanted:
            stale.unlink()
            print(f"removed {stale.relative_to(paths.root)}")
    for name, text in wanted.items():
        (paths.chart_crds / name).write_text(text)
        print(f"wrote {(paths.chart_crds / name).relative_to(paths.root)}")
    if not wanted:
        print("crds/ holds no CRD yet: the chart renders none")


def check_crds(paths: Paths, chart: Any, errors: list[str]) -> None:
    sources = source_crds(paths)
    templates = {p.name: p.read_text() for p in sorted(paths.chart_crds.glob("*.yaml"))}
    if not sources:
        print("  note: crds/ holds no CRD yet; the chart ships none")
    if set(sources) != set(templates):
        errors.append(
            f"chart CRDs {sorted(templates)} differ from crds/ {sorted(sources)}: run `python3 .ci/chart.py sync-crds`"
        )
        return
    stale = [name for name, text in sources.items() if templates[name] != crd_template(name, text)]
    for name in stale:
        errors.append(f"templates/crds/{name} is stale against crds/{name}: run `python3 .ci/chart.py sync-crds`")
    if stale:
        return

    # The templates are only text; render them to prove Helm turns them back into the source
    # objects, with the keep annotation exactly when crds.keep says so.
    for values, keep in (({}, True), ({"crds": {"keep": False}}, False)):
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        for name, text in sources.items():
            key = f"{CHART_NAME}/templates/crds/{name}"
            try:
                got = helm.values_from_yaml(rendered.get(key, ""))
                want = helm.values_from_yaml(text)
            except helm.HelmValuesError as err:
                errors.append(f"crds/{name} or its rendering is not valid YAML: {err}")
                continue
            if keep:
                want.setdefault("metadata", {}).setdefault("annotations", {})[KEEP_ANNOTATION] = "keep"
            if got != want:
                errors.append(f"rendered {key} (crds.keep={keep}) is not crds/{name} plus the keep annotation")
    rendered = chart.render({"crds": {"install": False}}, name=RELEASE, namespace=NAMESPACE)
    leftover = [k for k, v in rendered.items() if "/templates/crds/" in k and v.strip()]
    if leftover:
        errors.append(f"crds.install=false still renders {leftover}")


# ---------------------------------------------------------------------------------------------
# Rendering


def render(chart: Any, values: dict[str, Any]) -> dict[str, str]:
    """Rendered templates keyed by their path under templates/, empty ones dropped."""
    prefix = f"{CHART_NAME}/templates/"
    out = {}
    for key, text in chart.render(values, name=RELEASE, namespace=NAMESPACE).items():
        if not key.startswith(prefix):
            raise SystemExit(f"unexpected rendered path {key}")
        if text.strip():
            out[key[len(prefix) :]] = text
    return out


def documents(text: str) -> list[str]:
    """Non-empty YAML documents of a multi-document stream (comment-only ones dropped)."""
    docs = re.split(r"(?m)^---\s*$", text)
    return [d for d in docs if any(l.strip() and not l.lstrip().startswith("#") for l in d.splitlines())]


def write_case(paths: Paths, case: str, rendered: dict[str, str]) -> None:
    out = paths.render_out / case
    if out.exists():
        shutil.rmtree(out)
    for rel, text in rendered.items():
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text if text.endswith("\n") else text + "\n")


# ---------------------------------------------------------------------------------------------
# deploy/


def deploy_files(chart: Any) -> dict[str, str]:
    """Every file of deploy/ except argocd/, keyed by path relative to deploy/."""
    files: dict[str, str] = {}
    for rel, text in render(chart, {}).items():
        if rel == "NOTES.txt":
            continue
        # Plain manifests are not a Helm release: drop the chart-version label (it would churn
        # every object on each chart bump) and say who manages them.
        text = re.sub(r"(?m)^\s*helm\.sh/chart: .*\n", "", text)
        text = re.sub(r"(?m)^(\s*app\.kubernetes\.io/managed-by: )Helm$", r"\1kubectl", text)
        files[rel] = GENERATED_HEADER + text.lstrip("\n").rstrip("\n") + "\n"
    files["namespace.yaml"] = GENERATED_HEADER + (
        "apiVersion: v1\n"
        "kind: Namespace\n"
        "metadata:\n"
        f"  name: {NAMESPACE}\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: appconn\n"
        "    app.kubernetes.io/managed-by: kubectl\n"
        "    # The operator runs under the restricted Pod Security Standard: enforce it.\n"
        "    pod-security.kubernetes.io/enforce: restricted\n"
    )
    # The Namespace first, then CRDs, then the rest: kustomize sorts by kind anyway, this order
    # only keeps the file readable.
    order = ["namespace.yaml"] + sorted(r for r in files if r.startswith("crds/")) + sorted(
        r for r in files if r != "namespace.yaml" and not r.startswith("crds/")
    )
    files["kustomization.yaml"] = (
        GENERATED_HEADER
        + "# Install: kubectl apply --server-side -k deploy/\n"
        + "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        + "kind: Kustomization\n"
        + "resources:\n"
        + "".join(f"  - {r}\n" for r in order)
    )
    return files


def existing_deploy_files(paths: Paths) -> dict[str, str]:
    if not paths.deploy.is_dir():
        return {}
    return {
        str(p.relative_to(paths.deploy)): p.read_text()
        for p in sorted(paths.deploy.rglob("*"))
        if p.is_file() and p.relative_to(paths.deploy).parts[0] != "argocd"
    }


def render_deploy(paths: Paths) -> None:
    wanted = deploy_files(load_chart(paths))
    for rel in existing_deploy_files(paths):
        if rel not in wanted:
            (paths.deploy / rel).unlink()
            print(f"removed deploy/{rel}")
    for rel, text in wanted.items():
        dest = paths.deploy / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        print(f"wrote deploy/{rel}")
    crds_dir = paths.deploy / "crds"
    if crds_dir.is_dir() and not any(crds_dir.iterdir()):
        crds_dir.rmdir()


def check_deploy(paths: Paths, chart: Any, errors: list[str]) -> None:
    wanted = deploy_files(chart)
    have = existing_deploy_files(paths)
    for rel in sorted(set(wanted) | set(have)):
        if wanted.get(rel) != have.get(rel):
            state = "missing" if rel not in have else "not generated by the chart" if rel not in wanted else "stale"
            errors.append(f"deploy/{rel} is {state}: run `python3 .ci/chart.py render-deploy`")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("  skipped `kubectl kustomize deploy/`: no kubectl on PATH")
        return
    built = subprocess.run([kubectl, "kustomize", str(paths.deploy)], capture_output=True, text=True)
    if built.returncode != 0:
        errors.append(f"kubectl kustomize deploy/ failed: {built.stderr.strip()}")
        return
    expected = sum(len(documents(t)) for r, t in wanted.items() if r != "kustomization.yaml")
    got = len(documents(built.stdout))
    if got != expected:
        errors.append(f"kubectl kustomize deploy/ built {got} objects, deploy/ holds {expected}")
    else:
        print(f"  kubectl kustomize deploy/: {got} objects")


# ---------------------------------------------------------------------------------------------
# Docs

# Values whose content is a Kubernetes type or a free map: documented as a whole.
WHOLE_VALUES = {
    "resources", "podSecurityContext", "securityContext", "podAnnotations", "podLabels",
    "nodeSelector", "affinity",
}


def documented_keys(values: dict[str, Any]) -> list[str]:
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in WHOLE_VALUES:
            keys.extend(f"{key}.{sub}" for sub in value)
        else:
            keys.append(key)
    return keys


def check_values_documented(paths: Paths, chart: Any, errors: list[str]) -> None:
    """The values table of the installation docs (docs/install.md, or README.md once the
    sections are merged there) must list every value the chart has."""
    docs = [p for p in (paths.root / "README.md", paths.root / "docs" / "install.md") if p.is_file()]
    tables = [p for p in docs if "| `replicaCount` |" in p.read_text()]
    if not tables:
        errors.append("no values table (a row for `replicaCount`) in README.md or docs/install.md")
        return
    for doc in tables:
        text = doc.read_text()
        missing = [k for k in documented_keys(chart.values) if f"| `{k}` |" not in text]
        if missing:
            errors.append(f"{doc.relative_to(paths.root)}: values table lacks {missing}")


# ---------------------------------------------------------------------------------------------


def load_chart(paths: Paths) -> Any:
    return helm.Chart.load(str(paths.chart))


def lint(paths: Paths, case: str, values: dict[str, Any], errors: list[str]) -> None:
    report = helm.lint(str(paths.chart), values, strict=True, namespace=NAMESPACE)
    # Severity 2 is a warning, 3 an error; strict lint fails on both, as `helm lint --strict`.
    for message in report["messages"]:
        if message["severity"] >= 2:
            errors.append(f"lint ({case}): {message['path']}: {message['error'].strip()}")
    for error in report["errors"]:
        if not any(error.strip() in e for e in errors):
            errors.append(f"lint ({case}): {error.strip()}")


def check(paths: Paths) -> int:
    errors: list[str] = []
    chart = load_chart(paths)
    print(f"chart {chart.name} {chart.version} (Helm SDK {helm.helm_sdk_version()})")

    for case, values in CASES.items():
        lint(paths, case, values, errors)
        rendered = render(chart, values)
        write_case(paths, case, rendered)
        count = sum(len(documents(t)) for r, t in rendered.items() if r.endswith(".yaml"))
        print(f"  rendered {case}: {count} documents -> {(paths.render_out / case).relative_to(paths.root)}/")

    notes_off = render(chart, CASES["persistence-off"]).get("NOTES.txt", "")
    notes_on = render(chart, CASES["default"]).get("NOTES.txt", "")
    if "LOST" not in notes_off:
        errors.append("NOTES.txt does not warn that persistence.enabled=false loses the store")
    if "LOST" in notes_on:
        errors.append("NOTES.txt warns about data loss although persistence is on")

    for label, values, expected in BAD_VALUES:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmValuesError as err:
            message = str(err)
            if "schema" not in message or expected not in message:
                errors.append(f"bad values ({label}) failed, but not with the expected schema error: {message!r}")
            else:
                print(f"  refused {label}: {message.splitlines()[-1].strip()}")
        else:
            errors.append(f"bad values ({label}) {values} rendered without a schema error")

    for label, values, expected in BAD_COMBINATIONS:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmError as err:
            if expected not in str(err):
                errors.append(f"bad values ({label}) failed, but not with {expected!r}: {err}")
            else:
                print(f"  refused {label}: {expected}")
        else:
            errors.append(f"bad values ({label}) {values} rendered without an error")

    check_crds(paths, chart, errors)
    check_deploy(paths, chart, errors)
    check_values_documented(paths, chart, errors)

    if errors:
        print("\nchart check FAILED:", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    print("chart check passed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check", "render-deploy", "sync-crds"])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args()
    paths = Paths(args.root.resolve())
    if args.command == "check":
        return check(paths)
    if args.command == "render-deploy":
        render_deploy(paths)
    else:
        sync_crds(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
