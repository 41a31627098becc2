"""The cluster and Kubernetes files validate offline (docs/operations.md).

* KubeRay resources (``manifests/generated/``) against the CRDs' OpenAPI schemas in
  ``../shared/schemas/kuberay/`` (or ``$DEEPOMNI_KUBERAY_SCHEMAS``; else the gzipped copy in
  ``manifests/schemas/kuberay/``), strictly: unknown fields fail, as with
  ``kubectl apply --validate=strict``; core kinds and every pod template with ``kubernetes-validate``.
* The generated files are what ``manifests/generate.py`` renders now; the RayService's ``serveConfigV2`` is
  ``serve_apps/config.yaml`` with only the changes values.yaml names; every job's command line parses with
  the job's own argument parser.
* ``cluster/launcher.yaml`` passes Ray's own cluster-launcher validation (``ray/autoscaler/ray-schema.json``).
* ``manifests/generated/kustomization.yaml`` lists exactly the generated files with their image and namespace,
  and (where ``kubectl`` is installed) an overlay retargets both with ``kubectl kustomize``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "manifests" / "generated"
SCHEMAS = Path(os.environ.get("DEEPOMNI_KUBERAY_SCHEMAS", ROOT.parent / "shared" / "schemas" / "kuberay"))
VENDORED = ROOT / "manifests" / "schemas" / "kuberay"  # KubeRay v1.7 CRDs (Apache-2.0), gzipped
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
        if p.name == gen.KUSTOMIZATION:  # not a resource (tests of its own below)
            continue
        for d in yaml.load_all(p.read_text(), Loader=Loader):
            if d is not None:
                out.append((str(p.relative_to(GENERATED)), d))
    return out


DOCS = _docs()


def _of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(p, d) for p, d in DOCS if d["kind"] in kinds]


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

    stages = {d["metadata"]["labels"].get("deepomni.io/stage") for _, d in _of_kind("RayJob")}
    assert set(STAGES) <= stages, f"stages without a RayJob: {set(STAGES) - stages}"
    entry = " ".join(d["spec"]["entrypoint"] for _, d in _of_kind("RayJob"))
    for module in ("jobs.prepare_data", "jobs.profile_load", "jobs.pairs", "jobs.evaluate", "jobs.pipeline"):
        assert f"-m {module} " in entry


@pytest.mark.parametrize("path,doc", _of_kind(*CRD_FILES), ids=[p for p, _ in _of_kind(*CRD_FILES)])
def test_kuberay_resource_validates_against_crd(path, doc):
    errors = crd_errors(doc)
    assert not errors, f"{path}:\n" + "\n".join(errors)


def _first(kind: str) -> dict:
    return copy.deepcopy(next(d for _, d in DOCS if d["kind"] == kind))


def _cluster(doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


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
    BREAKAGES[breakage](_cluster(doc))
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


def _pod_templates(doc: dict) -> list[dict]:
    c = _cluster(doc)
    return [c["headGroupSpec"]["template"]] + [g["template"] for g in c["workerGroupSpecs"]]


KUBERAY = _of_kind(*CRD_FILES)


@pytest.mark.parametrize("path,doc", KUBERAY, ids=[p for p, _ in KUBERAY])
def test_pod_templates_validate_as_core_podtemplates(path, doc):
    for i, t in enumerate(_pod_templates(doc)):
        pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": t}
        assert _core_errors(pt) is None, f"{path} template {i}: {_core_errors(pt)}"


def test_broken_core_kinds_fail():
    pvc = copy.deepcopy(next(d for _, d in CORE if d["kind"] == "PersistentVolumeClaim"))
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    assert _core_errors(pvc)
    cm = copy.deepcopy(next(d for _, d in CORE if d["kind"] == "ConfigMap"))
    cm["data"]["n"] = 1
    assert _core_errors(cm)
    t = copy.deepcopy(_pod_templates(_first("RayJob"))[0])
    t["spec"]["containers"][0]["volumeMounts"][0]["mountpath"] = "/x"
    assert _core_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})


DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_names_namespaces_and_references():
    values = gen.load_values()
    names = set()
    for path, d in DOCS:
        m = d["metadata"]
        assert DNS1123_LABEL.match(m["name"]) and len(m["name"]) <= 47, path  # KubeRay derives longer names
        if d["kind"] != "Namespace":
            assert m["namespace"] == values["namespace"], path
        assert (d["kind"], m["name"]) not in names, path
        names.add((d["kind"], m["name"]))
    claims = {d["metadata"]["name"] for _, d in _of_kind("PersistentVolumeClaim")}
    maps = {d["metadata"]["name"] for _, d in _of_kind("ConfigMap")}
    for path, d in KUBERAY:
        for t in _pod_templates(d):
            for vol in t["spec"]["volumes"]:
                if "persistentVolumeClaim" in vol:
                    assert vol["persistentVolumeClaim"]["claimName"] in claims, path
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in maps, path


def test_gpu_groups_request_gpus_where_users_expect_them():
    values = gen.load_values()
    for path, d in KUBERAY:
        c = _cluster(d)
        head = c["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"], path
        for g in c["workerGroupSpecs"]:
            want = values["workerGroups"][g["groupName"]]
            spec = g["template"]["spec"]
            res = spec["containers"][0]["resources"]
            assert res["limits"].get("nvidia.com/gpu", 0) == want["gpus"], path
            assert res["requests"] == res["limits"], path  # extended resources need requests == limits
            assert spec.get("nodeSelector", {}) == want["nodeSelector"], path
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], path
            assert any(m["mountPath"] == "/dev/shm" for m in spec["containers"][0]["volumeMounts"])
    gpu = values["workerGroups"]["gpu"]
    assert gpu["gpus"] >= 1 and gpu["tolerations"]
    workers = gen.train_config(values)["num_workers"]
    assert workers <= gpu["maxReplicas"] * gpu["gpus"], "training would wait forever for GPUs"


# ------------------------------------------------------------------------------- generated and sources
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


def test_serve_config_v2_is_generated_from_serve_apps_config():
    values = gen.load_values()
    (svc,) = [d for _, d in _of_kind("RayService")]
    deployed = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert deployed == gen.serve_config(values)
    # and it is the source file with only the changes values.yaml names
    source = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    (app,) = deployed["applications"]
    (src_app,) = source["applications"]
    assert deployed["proxy_location"] == source["proxy_location"]
    assert deployed["http_options"] == {**source["http_options"], "host": values["serve"]["http_host"]}
    assert {k: v for k, v in app.items() if k not in ("args", "deployments")} == \
        {k: v for k, v in src_app.items() if k not in ("args", "deployments")}
    assert app["args"] == {**src_app["args"], **values["serve"]["args"]}
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in src_app["deployments"]]
    for d, s in zip(app["deployments"], src_app["deployments"]):
        over = values["serve"]["deployments"].get(d["name"], {})
        for key in set(d) | set(s):
            if key in over:
                assert d[key] == {**s.get(key, {}), **over[key]}
            else:
                assert d[key] == s[key], (d["name"], key)
    # the app's own loader accepts these args
    from serve_apps.loading import AppConfig

    AppConfig.from_args({**app["args"], "checkpoint": None})  # the checkpoint exists only on the volume


def test_serve_config_change_reaches_the_rayservice(tmp_path):
    src = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    src["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] = 7
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(src))
    cfg = gen.serve_config(gen.load_values(), source=p)
    assert cfg["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 7


def test_print_options_match_the_manifests(capsys):
    assert gen.main(["--print-serve-config"]) == 0
    (svc,) = [d for _, d in _of_kind("RayService")]
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert gen.main(["--print-train-config"]) == 0
    (cm,) = [d for _, d in _of_kind("ConfigMap")]
    assert json.loads(capsys.readouterr().out) == json.loads(cm["data"]["train.json"])


def test_train_config_map_is_a_valid_train_config():
    from deepomni.train.config import TrainConfig

    (cm,) = [d for _, d in _of_kind("ConfigMap")]
    cfg = TrainConfig.from_dict(json.loads(cm["data"]["train.json"]))
    cfg.validate()
    values = gen.load_values()
    for k, v in values["train"]["overrides"].items():
        assert getattr(cfg, k) == v


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("path,doc", _of_kind("RayJob"), ids=[p for p, _ in _of_kind("RayJob")])
def test_job_entrypoints_parse(path, doc, tmp_path, monkeypatch):
    """Each entrypoint's flags are accepted by the job's own parser (nothing runs: parsing stops it)."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), path
    (cm,) = [d for _, d in _of_kind("ConfigMap")]
    config = tmp_path / "train.json"
    config.write_text(cm["data"]["train.json"])
    args = [str(config) if a == gen.TRAIN_CONFIG else a for a in argv[3:]]
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, a=None, namespace=None):
        seen["ns"] = original(self, a, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [argv[2], *args])
    with pytest.raises(_Parsed):
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    assert seen["ns"] is not None


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
    assert len(used) == 1 and sum(len(_images(d)) for _, d in _of_kind(*CRD_FILES)) >= 3 * len(KUBERAY)
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
