import json
import os

import pytest

from deepomni.cli import main


def test_info_prints_counts(capsys):
    assert main(["info", "--preset", "deepseek-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "total parameters:  15.83B" in out and "active 2.45B" in out and "total 15.71B" in out


def test_info_json_and_bad_preset(capsys):
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["hidden_size"] == 128 and 1e6 < d["parameters"]["total"] < 1e7
    assert main(["info", "--preset", "nope"]) == 2
    assert "unknown model preset" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so_before_starting_ray(capsys, monkeypatch):
    import socket

    import ray

    monkeypatch.setattr("serve_apps.cli.demo_model", lambda repo: None)
    for var in ("RAY_AUTH_MODE", "RAY_SERVE_HAPROXY_BINARY_PATH"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--port" in err
    assert not ray.is_initialized()
    # refused before the Serve settings (serve_apps/ray_mode.py) reach this process's environment
    assert "RAY_AUTH_MODE" not in os.environ and "RAY_SERVE_HAPROXY_BINARY_PATH" not in os.environ


def test_version_and_plain_help(capsys):
    from deepomni import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"deepomni {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "info" in out and "serve" in out  # no reST markup


def test_data_prepare_flags_take_their_config_types(capsys):
    """Flags derived from DataConfig convert from its type hints (`float | None` -> float): a bad value is an
    argparse error naming the flag, not a TypeError deep in the pipeline."""
    import argparse

    from deepomni.data.cli import _add_prepare_args

    p = argparse.ArgumentParser()
    _add_prepare_args(p)
    a = p.parse_args(["--out", "x", "--max-audio-seconds", "20", "--feature-actors", "2"])
    assert a.max_audio_seconds == 20.0 and isinstance(a.max_audio_seconds, float) and a.feature_actors == 2
    assert p.parse_args(["--out", "x"]).max_audio_seconds is None  # the default stays None
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "x", "--max-audio-seconds", "twenty"])
    assert "--max-audio-seconds: invalid float value" in capsys.readouterr().err
