"""What the generated Kubernetes resources say (``manifests/generated/``; their validation:
tests/test_manifests.py, docs/operations.md).

* Names, namespaces and references between the resources; the GPU worker groups request GPUs where users
  expect them.
* The RayService's ``serveConfigV2`` is ``serve_apps/config.yaml`` with only the changes values.yaml names; the
  training ConfigMap is a valid TrainConfig; every job's command line parses with the job's own argument parser.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
import shlex
import sys

import pytest
import yaml

from tests.helpers.manifests import DOCS, KUBERAY, ROOT, cluster_spec, gen, of_kind, pod_templates


# ------------------------------------------------------------------------------- names, GPUs
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
    claims = {d["metadata"]["name"] for _, d in of_kind("PersistentVolumeClaim")}
    maps = {d["metadata"]["name"] for _, d in of_kind("ConfigMap")}
    for path, d in KUBERAY:
        for t in pod_templates(d):
            for vol in t["spec"]["volumes"]:
                if "persistentVolumeClaim" in vol:
                    assert vol["persistentVolumeClaim"]["claimName"] in claims, path
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in maps, path


def test_gpu_groups_request_gpus_where_users_expect_them():
    values = gen.load_values()
    for path, d in KUBERAY:
        c = cluster_spec(d)
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


# ------------------------------------------------------------------------------- generated from sources
def test_serve_config_v2_is_generated_from_serve_apps_config():
    values = gen.load_values()
    (svc,) = [d for _, d in of_kind("RayService")]
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
    from deepomni.serve.config import AppConfig

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
    (svc,) = [d for _, d in of_kind("RayService")]
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert gen.main(["--print-train-config"]) == 0
    (cm,) = [d for _, d in of_kind("ConfigMap")]
    assert json.loads(capsys.readouterr().out) == json.loads(cm["data"]["train.json"])


def test_train_config_map_is_a_valid_train_config():
    from deepomni.train.config import TrainConfig

    (cm,) = [d for _, d in of_kind("ConfigMap")]
    cfg = TrainConfig.from_dict(json.loads(cm["data"]["train.json"]))
    cfg.validate()
    values = gen.load_values()
    for k, v in values["train"]["overrides"].items():
        assert getattr(cfg, k) == v


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("path,doc", of_kind("RayJob"), ids=[p for p, _ in of_kind("RayJob")])
def test_job_entrypoints_parse(path, doc, tmp_path, monkeypatch):
    """Each entrypoint's flags are accepted by the job's own parser (nothing runs: parsing stops it)."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), path
    (cm,) = [d for _, d in of_kind("ConfigMap")]
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
