import json

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
    assert "unknown preset" in capsys.readouterr().err
