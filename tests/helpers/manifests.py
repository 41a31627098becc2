"""The generated Kubernetes manifests (``manifests/generated/``, rendered by ``manifests/generate.py``): the
generator module, every resource as ``(file, document)``, those of given kinds, a KubeRay resource's cluster
spec and pod templates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "manifests" / "generated"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_generator():
    spec = importlib.util.spec_from_file_location("deepomni_manifests_generate", ROOT / "manifests" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def _docs() -> list[tuple[str, dict]]:
    out = []
    for p in sorted(GENERATED.rglob("*.yaml")):
        if p.name == gen.KUSTOMIZATION:  # not a resource (tests of its own in tests/test_manifests.py)
            continue
        for d in yaml.load_all(p.read_text(), Loader=Loader):
            if d is not None:
                out.append((str(p.relative_to(GENERATED)), d))
    return out


DOCS = _docs()


def of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(p, d) for p, d in DOCS if d["kind"] in kinds]


KUBERAY = of_kind(*CRD_FILES)


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def pod_templates(doc: dict) -> list[dict]:
    c = cluster_spec(doc)
    return [c["headGroupSpec"]["template"]] + [g["template"] for g in c["workerGroupSpecs"]]
