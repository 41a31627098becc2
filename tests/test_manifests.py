"""The cluster and Kubernetes files validate offline (docs/operations.md); what the generated resources say
(names, GPUs, the Serve and training configs, the jobs' command lines): tests/test_manifests_contents.py.

* KubeRay resources (``manifests/generated/``) against the CRDs' OpenAPI schemas in
  ``../shared/schemas/kuberay/`` (or ``$DEEPOMNI_KUBERAY_SCHEMAS``; else the gzipped copy in
  ``manifests/schemas/kuberay/``), strictly: unknown fields fail, as with
  ``kubectl apply --validate=strict``; core kinds and every pod template with ``kubernetes-validate``.
* The generated files are what ``manifests/generate.py`` renders now.
* ``cluster/launcher.yaml`` passes Ray's own cluster-launcher validation (``ray/autoscaler/ray-schema.json``).
* ``manifests/generated/kustomization.yaml`` lists exactly the generated files with their image and namespace,
  and (where ``kubectl`` is installed) an overlay retargets both with ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
import functools
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers.manifests import (CRD_FILES, DOCS, GENERATED, KUBERAY, ROOT, Loader, cluster_spec, gen, of_kind,
                                     pod_templates)

SCHEMAS = Path(os.environ.get("DEEPOMNI_KUBERAY_SCHEMAS", ROOT.parent / "shared" / "schemas" / "kuberay"))
VENDORED = ROOT / "manifests" / "schemas" / "kuberay"  # KubeRay v1.7 CRDs (Apache-2.0), gzipped


# ------------------------------------------------------------------------------- CRD schema validation
def k8s_to_jsonschema(node, strict: bool = True):
    """An OpenAPI v3 structural schema (CRD) as plain JSON Schema: ``x-kubernetes-int-or-string`` -> integer
    or string, ``nullable`` -> null allowed, and (strict) objects with ``properties`` reject other fields
    unless ``x-kubernetes-preserve-unknown-fields`` keeps them. CEL rules (``x-kubernetes-validations``)
    and ``format`` are not checked."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties", "definitions"):
            out[k] = {name: k8s_to_jsonschema(s, strict) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[k] = k8s_to_jsonschema(v, strict)
        else:
            out[k] = v
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        if "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource") and "properties" in out:
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, **out["properties"]}
    if (strict and out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str = "v1") -> jsonschema.Draft7Validator:
    path = SCHEMAS / CRD_FILES[kind]
    if path.is_file():
        text = path.read_text()
    else:  # the same KubeRay v1.7 CRDs, kept in the repository (gzip) so that CI validates without ../shared
        text = gzip.decompress((VENDORED / f"{CRD_FILES[kind]}.gz").read_bytes()).decode()
    crd = yaml.load(text, Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert ver["served"]
    schema = k8s_to_jsonschema(ver["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    api, version = doc["apiVersion"].split("/")
    assert api == "ray.io"
    v = crd_validator(doc["kind"], version)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def test_generated_has_every_resource():
    kinds = [d["kind"] for _, d in DOCS]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1
    assert {"Namespace", "PersistentVolumeClaim", "ConfigMap"} <= set(kinds)
    from deepomni.train.stages import STAGES

    stages = {d["metadata"]["labels"].get("deepomni.io/stage") for _, d in of_kind("RayJob")}
    assert set(STAGES) <= stages, f"stages without a RayJob: {set(STAGES) - stages}"
    entry = " ".join(d["spec"]["entrypoint"] for _, d in of_kind("RayJob"))
    for module in ("jobs.prepare_data", "jobs.profile_load", "jobs.pairs", "jobs.evaluate", "jobs.pipeline"):
        assert f"-m {module} " in entry


@pytest.mark.parametrize("path,doc", of_kind(*CRD_FILES), ids=[p for p, _ in of_kind(*CRD_FILES)])
def test_kuberay_resource_validates_against_crd(path, doc):
    errors = crd_errors(doc)
    assert not errors, f"{path}:\n" + "\n".join(errors)


def _first(kind: str) -> dict:
    return copy.deepcopy(next(d for _, d in DOCS if d["kind"] == kind))


BREAKAGES = {
    "unknown field (typo)": lambda c: c["headGroupSpec"].update(rayStartParam={"num-cpus": "0"}),
    "unknown container field": lambda c: c["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    .update(resource={}),
    "replicas not an integer": lambda c: c["workerGroupSpecs"][0].update(replicas="two"),
    "rayStartParams value not a string": lambda c: c["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    "auth mode not in enum": lambda c: c.update(authOptions={"mode": "tokens"}),
    "head template missing": lambda c: c["headGroupSpec"].pop("template"),
    "container without name": lambda c: c["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0].pop("name"),
    "quantity neither int nor string": lambda c: c["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0]
    ["resources"]["limits"].update({"nvidia.com/gpu": [1]}),
    "malformed quantity": lambda c: c["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    .update(memory="32 gigs"),
}


@pytest.mark.parametrize("kind", list(CRD_FILES))
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_manifest_fails_crd_validation(kind, breakage):
    doc = _first(kind)
    assert not crd_errors(doc)
    BREAKAGES[breakage](cluster_spec(doc))
    assert crd_errors(doc), f"{kind}: '{breakage}' was not caught"


def test_broken_top_level_fields_fail():
    job = _first("RayJob")
    job["spec"]["entrypoint"] = ["python", "-m", "jobs.train"]
    assert crd_errors(job)
    svc = _first("RayService")
    svc["spec"]["serveConfigV2"] = yaml.safe_load(svc["spec"]["serveConfigV2"])  # must be a YAML string
    assert crd_errors(svc)
    svc = _first("RayService")
    del svc["spec"]["rayClusterConfig"]
    assert crd_errors(svc)


# --------------------------------------------------------------------------------- core Kubernetes kinds
def _kv():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


def _core_errors(doc: dict) -> str | None:
    kv = _kv()
    try:
        kv.validate(doc, kv.latest_version(), strict=True)
    except (kv.ValidationError, jsonschema.ValidationError) as e:
        return f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
    return None


CORE = [(p, d) for p, d in DOCS if d["apiVersion"] == "v1"]


@pytest.mark.parametrize("path,doc", CORE, ids=[p for p, _ in CORE])
def test_core_kinds_validate(path, doc):
    assert _core_errors(doc) is None, path


@pytest.mark.parametrize("path,doc", KUBERAY, ids=[p for p, _ in KUBERAY])
def test_pod_templates_validate_as_core_podtemplates(path, doc):
    for i, t in enumerate(pod_templates(doc)):
        pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": t}
        assert _core_errors(pt) is None, f"{path} template {i}: {_core_errors(pt)}"


def test_broken_core_kinds_fail():
    pvc = copy.deepcopy(next(d for _, d in CORE if d["kind"] == "PersistentVolumeClaim"))
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    assert _core_errors(pvc)
    cm = copy.deepcopy(next(d for _, d in CORE if d["kind"] == "ConfigMap"))
    cm["data"]["n"] = 1
    assert _core_errors(cm)
    t = copy.deepcopy(pod_templates(_first("RayJob"))[0])
    t["spec"]["containers"][0]["volumeMounts"][0]["mountpath"] = "/x"
    assert _core_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})


# ------------------------------------------------------------------------------- generated files
def test_generated_files_are_up_to_date():
    assert gen.stale() == [], "manifests/generated is stale: run .venv/bin/python manifests/generate.py"


def test_stale_check_notices_a_hand_edit(tmp_path):
    out = tmp_path / "generated"
    assert gen.main(["--out", str(out)]) == 0
    assert gen.stale(out) == []
    f = out / "raycluster.yaml"
    f.write_text(f.read_text() + "# a hand edit\n")
    (out / "jobs" / "extra.yaml").write_text("{}\n")
    assert gen.stale(out) == ["jobs/extra.yaml", "raycluster.yaml"]


# -------------------------------------------------------------------------------------------- kustomize
KUSTOMIZATION = GENERATED / gen.KUSTOMIZATION


def _kustomization() -> dict:
    return yaml.load(KUSTOMIZATION.read_text(), Loader=Loader)


def _images(node) -> list[str]:
    """Every ``image`` of a container or init container anywhere in a resource (kustomize's images transformer
    looks at the same fields, in any kind)."""
    if isinstance(node, list):
        return [i for n in node for i in _images(n)]
    if not isinstance(node, dict):
        return []
    out = [c["image"] for key in ("containers", "initContainers") for c in node.get(key, []) if "image" in c]
    return out + [i for k, v in node.items() if k not in ("containers", "initContainers") for i in _images(v)]


def test_kustomization_lists_exactly_the_generated_manifests():
    k = _kustomization()
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    present = sorted(str(p.relative_to(GENERATED)) for p in GENERATED.rglob("*.yaml") if p != KUSTOMIZATION)
    assert k["resources"] == present
    assert sorted({p for p, _ in DOCS}) == present  # each listed file holds resources (none empty)
    values = gen.load_values()
    assert k["namespace"] == values["namespace"]
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for _, d in DOCS} == {k["namespace"]}


def test_kustomization_image_is_the_image_of_every_container():
    (entry,) = _kustomization()["images"]
    used = {i for _, d in DOCS for i in _images(d)}
    assert len(used) == 1 and sum(len(_images(d)) for _, d in of_kind(*CRD_FILES)) >= 3 * len(KUBERAY)
    (image,) = used
    assert image == gen.load_values()["image"]
    rebuilt = entry["name"] + (f":{entry['newTag']}" if "newTag" in entry else "") + (
        f"@{entry['digest']}" if "digest" in entry else "")
    assert rebuilt == image and "newName" not in entry  # the base changes nothing; an overlay does


@pytest.mark.parametrize("image,parts", [
    ("ghcr.io/your-org/deepomni:0.1.0", ("ghcr.io/your-org/deepomni", "0.1.0", None)),
    ("registry:5000/deepomni", ("registry:5000/deepomni", None, None)),
    ("registry:5000/deepomni:1.2", ("registry:5000/deepomni", "1.2", None)),
    ("deepomni@sha256:" + "a" * 64, ("deepomni", None, "sha256:" + "a" * 64)),
])
def test_split_image(image, parts):
    assert gen.split_image(image) == parts


def test_every_resource_is_labelled_with_its_file():
    stems = [d["metadata"]["labels"][gen.MANIFEST_LABEL] for _, d in DOCS]
    assert stems == [Path(p).stem for p, _ in DOCS] and len(set(stems)) == len(stems)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_overlay_changes_image_and_namespace(tmp_path):
    def build(d: Path) -> list[dict]:
        out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [x for x in yaml.load_all(out.stdout, Loader=Loader) if x]

    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(build(GENERATED), key=key) == sorted((d for _, d in DOCS), key=key)  # the base as generated
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (entry,) = _kustomization()["images"]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(GENERATED, overlay)], "namespace": "ml-prod",
        "images": [{"name": entry["name"], "newName": "registry.example.com/deepomni", "newTag": "1.2"}]}))
    docs = build(overlay)
    assert len(docs) == len(DOCS)
    assert {i for d in docs for i in _images(d)} == {"registry.example.com/deepomni:1.2"}
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in docs} == {"ml-prod"}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == ["ml-prod"]


# --------------------------------------------------------------------------------- cluster/ directory
@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())


def test_launcher_structure(launcher):
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    assert head in types
    workers = {k: t for k, t in types.items() if k != head}
    gpu = {k: t for k, t in workers.items() if "gpu" in k}
    assert gpu and len(workers) > len(gpu), "GPU and CPU worker types"
    for k, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], k
    assert sum(t["max_workers"] for t in workers.values()) <= launcher["max_workers"]
    assert launcher["docker"]["image"] == gen.load_values()["image"]  # one image for both
    assert any("ray start --head" in c and "--autoscaling-config" in c for c in launcher["head_start_ray_commands"])
    assert any("--metrics-export-port=8080" in c for c in launcher["worker_start_ray_commands"])
    assert any("import deepomni" in c for c in launcher["setup_commands"])
    assert any("/shared" in c for c in launcher["initialization_commands"])
    assert "-v /shared:/shared" in launcher["docker"]["run_options"]


def test_launcher_passes_rays_own_validation(launcher):
    util = pytest.importorskip("ray.autoscaler._private.util")
    import ray.autoscaler

    assert (Path(ray.autoscaler.__file__).parent / "ray-schema.json").is_file()
    cfg = util.prepare_config(copy.deepcopy(launcher))  # what `ray up` does before talking to the cloud
    util.validate_config(cfg)
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(broken))
    broken = copy.deepcopy(launcher)
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        util.validate_config(util.prepare_config(broken))


def test_dockerfile_copies_what_exists_and_installs_the_project():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=") and "cuda" in lines[0]
    assert any(line.startswith("FROM ${BASE_IMAGE}") for line in lines)
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
    assert any("pip install" in line and "--no-deps -e ." in line for line in lines)
    assert "constraints-cpu.txt" not in " ".join(lines)  # the GPU image keeps its CUDA torch
    assert "espeak-ng" in text and "PYTHONPATH=/app" in text
